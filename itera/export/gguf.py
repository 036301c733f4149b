"""GGUF export for llama.cpp, written with the ``gguf`` package.

Architecture ``llama``: Hugging Face's rotary layout (rotate-half) is turned into llama.cpp's
(interleaved pairs) by permuting the rows of q_proj and k_proj, as llama.cpp's own converter
does. Llama-3 rope scaling goes in a ``rope_freqs`` tensor of per-frequency factors; linear
scaling in metadata. The tokenizer goes in as llama.cpp's ``gpt2`` model (byte-level BPE) or
its ``llama`` model (SentencePiece-style BPE with byte fallback), so llama.cpp splits and
merges text exactly as itera does.

Tensor types: ``AUTO`` (the default), F32, F16, BF16, Q8_0, Q4_0 directly; 1-D tensors are
always F32, and a 2-D tensor whose rows are not a multiple of 32 falls back to F16 (listed in the
result). ``AUTO`` writes what the checkpoint holds: the GGUF block types of an ``itera quantize
--method auto`` checkpoint exactly as stored, Q4_0 / Q8_0 blocks from layers quantized
symmetrically with group size 32 at 4 / 8 bits (no re-quantization), and F16 for everything else
(so a float checkpoint becomes F16). llama.cpp's K-quants come from llama.cpp's own quantizer run
on an F16 export (:func:`llama_quantize`), with importance data when given calibration text.

:func:`write` and :func:`verify` are this format's entry in :data:`itera.export.formats.FORMATS`.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from itera.errors import CheckpointError, UnsupportedModelError, UsageError
from itera.export.gguf_vocab import check_tokenizer, write_vocab
from itera.model.checkpoint import TensorReader, read_headers
from itera.model.config import ModelConfig
from itera.storage.names import gguf_name, rope_permutation

AUTO = "AUTO"  # the checkpoint's own types
DIRECT_TYPES = (AUTO, "F32", "F16", "BF16", "Q8_0", "Q4_0")
# llama.cpp's quantizer, run through llama-cpp-python on an F16 file.
LLAMA_QUANT_TYPES = ("Q4_K_M", "Q4_K_S", "Q5_K_M", "Q5_K_S", "Q6_K", "Q3_K_M", "Q2_K", "Q4_1", "Q5_0", "Q5_1")
GGUF_TYPES = DIRECT_TYPES + LLAMA_QUANT_TYPES
BLOCK = 32
BLOCK_TYPES = ("Q8_0", "Q4_0")

def check_exportable(cfg: ModelConfig) -> None:
    if cfg.sliding_window is not None and cfg.sliding_window < cfg.max_position_embeddings:
        raise UnsupportedModelError(f"GGUF export of a sliding-window model ({cfg.model_type}, window "
                                    f"{cfg.sliding_window}) is not supported: llama.cpp's llama architecture has no "
                                    "sliding window")
    if cfg.mlp_bias:
        raise UnsupportedModelError("GGUF export of a model with MLP biases (mlp_bias) is not supported")


# --------------------------------------------------------------------------- metadata


def _model_metadata(w, cfg: ModelConfig, name: str, gguf_type: str) -> None:
    import gguf

    w.add_name(name)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_dimension_count(cfg.head_dim)
    if cfg.head_dim * cfg.num_attention_heads != cfg.hidden_size:
        w.add_key_length(cfg.head_dim)
        w.add_value_length(cfg.head_dim)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_vocab_size(cfg.vocab_size)
    w.add_file_type(file_type(gguf_type))
    if cfg.rope_type == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(float(cfg.rope_scaling["factor"]))


def file_type(gguf_type: str) -> int:
    """general.file_type for a file of mostly ``gguf_type`` (llama.cpp reports it; it reads each
    tensor's own type)."""
    import gguf

    names = {"F32": "ALL_F32", "Q2_K": "MOSTLY_Q2_K", "Q3_K": "MOSTLY_Q3_K_M", "Q4_K": "MOSTLY_Q4_K_M",
             "Q5_K": "MOSTLY_Q5_K_M"}
    return getattr(gguf.LlamaFileType, names.get(gguf_type, f"MOSTLY_{gguf_type}"))


def dominant_type(planned: list) -> str:
    """The type holding the most weights among the file's matrices."""
    weights: dict[str, int] = {}
    for t in planned:
        if len(t.shape) == 2:
            weights[t.type] = weights.get(t.type, 0) + int(np.prod(t.shape))
    return max(weights, key=weights.get) if weights else "F32"


# --------------------------------------------------------------------------- tensors


@dataclass
class Planned:
    """One tensor of the file: its GGUF name, numpy shape, type, and how to make its data."""

    name: str
    shape: tuple[int, ...]
    type: str  # F32 | F16 | BF16 | a GGML block type
    produce: Callable[[], np.ndarray]
    direct: bool = False  # blocks straight from an itera checkpoint's codes

    def info(self) -> tuple[tuple[int, ...], np.dtype, int, object]:
        """(shape, dtype, bytes, raw type) as GGUFWriter.add_tensor_info takes them."""
        import gguf

        if self.type == "F32":
            return self.shape, np.dtype(np.float32), 4 * int(np.prod(self.shape)), None
        if self.type == "F16":
            return self.shape, np.dtype(np.float16), 2 * int(np.prod(self.shape)), None
        qtype = getattr(gguf.GGMLQuantizationType, self.type)
        byte_shape = gguf.quants.quant_shape_to_byte_shape(self.shape, qtype)
        return byte_shape, np.dtype(np.uint8), int(np.prod(byte_shape)), qtype


F16_MAX = 65504.0


def _float_data(x: torch.Tensor, t: str, name: str = "") -> np.ndarray:
    import gguf

    x = x.float()
    if t == "F32":
        return x.numpy().astype(np.float32)
    big = float(x.abs().max()) if x.numel() else 0.0
    if not math.isfinite(big):
        raise CheckpointError(f"tensor {name} holds NaN or infinite values; pass a checkpoint with finite weights")
    limit = F16_MAX * {"F16": 1, "Q8_0": 127, "Q4_0": 8}.get(t, float("inf"))  # float16 values, or scales of blocks
    if big > limit:
        raise UsageError(f"tensor {name} holds values up to {big:.3g}, beyond what {t} can hold (at most {limit:.6g}: "
                         f"its float16 {'values' if t == 'F16' else 'block scales'} stop at {F16_MAX:g}); export with "
                         "--gguf-type F32 or BF16")
    if t == "F16":
        return x.numpy().astype(np.float16)
    return gguf.quants.quantize(x.numpy().astype(np.float32), getattr(gguf.GGMLQuantizationType, t))


def fallback_summary(fallbacks: list[dict], shown: int = 3) -> str | None:
    """One line for any number of fallbacks (a tensor whose rows no block of the type asked for
    divides, written in another type): how many, to which types, a few names, and where the rest
    are listed. None without fallbacks. Takes export's entries (``written``) and quantize's (``used``)."""
    if not fallbacks:
        return None
    used: dict[str, int] = {}
    for fb in fallbacks:
        t = fb.get("written") or fb.get("used")
        used[t] = used.get(t, 0) + 1
    wanted = "/".join(dict.fromkeys(str(fb["wanted"]) for fb in fallbacks))
    types = ", ".join(f"{t} ×{n}" for t, n in sorted(used.items(), key=lambda kv: -kv[1]))
    names = ", ".join(fb["tensor"] for fb in fallbacks[:shown])
    more = f" …and {len(fallbacks) - shown} more" if len(fallbacks) > shown else ""
    reasons = {fb.get("reason") for fb in fallbacks}
    why = f" ({reasons.pop()})" if len(reasons) == 1 and None not in reasons else ""
    n = len(fallbacks)
    return (f"{n} tensor{'s' if n != 1 else ''} fell back from {wanted} to {types}{why}: {names}{more} "
            "(each listed with its reason in the record's fallbacks)")


def plan_tensors(cfg: ModelConfig, src: TensorReader, gguf_type: str) -> tuple[list[Planned], list[dict], list[dict]]:
    """Every tensor the file will hold, in order, with its type; and the fallbacks taken.

    1-D tensors are F32. A tensor whose rows are not a multiple of 32 falls back to F16 for the
    block types. Layers itera quantized are written from their codes when the requested type is
    theirs (``AUTO``: always, where the layout has a GGUF type); otherwise they are re-quantized
    from their dequantized values (listed). Tensors quantize left in float are written in the
    requested type, like a float checkpoint's (``AUTO``: F16), so ``Q4_0`` means Q4_0 wherever a
    Q4_0 block fits."""
    from itera.model.checkpoint import expected_shapes
    from itera.storage.layout import layer_plan

    plan = layer_plan(cfg.quantization) if cfg.quantization else {}
    perms = {"self_attn.q_proj": rope_permutation(cfg.num_attention_heads, cfg.head_dim),
             "self_attn.k_proj": rope_permutation(cfg.num_key_value_heads, cfg.head_dim)}
    out: list[Planned] = []
    fallbacks: list[dict] = []
    requantized: list[dict] = []
    for hf, shape in expected_shapes(cfg).items():
        module = hf.rsplit(".", 1)[0]
        perm = next((p for suffix, p in perms.items() if module.endswith(suffix)), None)
        name = gguf_name(hf)
        if module in plan:
            out.append(_plan_quantized(name, module, shape, plan[module], perm, src, gguf_type, fallbacks, requantized))
            continue
        want = "F32" if len(shape) == 1 or gguf_type == "F32" else gguf_type
        if want == AUTO:
            want = "F16"  # the checkpoint's own types: what quantize left in float is 16-bit
        if want in BLOCK_TYPES and shape[-1] % BLOCK:
            fallbacks.append({"tensor": name, "wanted": want, "written": "F16",
                              "reason": f"row length {shape[-1]} is not a multiple of {BLOCK}"})
            want = "F16"
        out.append(Planned(name, shape, want, functools.partial(_load_float, src, hf, perm, want)))
    if cfg.rope_type == "llama3":
        from itera.model.llama import rope_inv_freq

        # llama.cpp divides each rotary frequency by its factor: unscaled / scaled.
        factors = (rope_inv_freq(dataclasses.replace(cfg, rope_scaling=None)) / rope_inv_freq(cfg)).float()
        out.append(Planned("rope_freqs.weight", tuple(factors.shape), "F32", lambda: factors.numpy().astype(np.float32)))
    return out, fallbacks, requantized


def _load_float(src: TensorReader, hf: str, perm, t: str) -> np.ndarray:
    x = src.get(hf)
    return _float_data(x if perm is None else x[perm], t, hf)


def _plan_quantized(name: str, module: str, shape: tuple, q, perm, src: TensorReader, gguf_type: str,
                    fallbacks: list, requantized: list) -> Planned:
    from itera.storage.layout import ggml_blocks, unpack

    stored = q.gguf_type
    if stored is not None and gguf_type in (AUTO, stored):
        def blocks():
            if q.kind == "ggml":
                b = src.get(module + ".ggml")
                return (b if perm is None else b[perm]).numpy()
            codes, scales = unpack(src.get(module + ".qweight"), q.bits, shape[1]), src.get(module + ".scales")
            if perm is not None:
                codes, scales = codes[perm], scales[perm]
            return ggml_blocks(codes, scales, q.bits)

        return Planned(name, shape, stored, blocks, direct=True)
    want = "F16" if gguf_type == AUTO else gguf_type
    if want in BLOCK_TYPES and shape[-1] % BLOCK:
        want = "F16"
    why = f"source is {q.label()}"
    if want != gguf_type:
        fallbacks.append({"tensor": name, "wanted": gguf_type, "written": want,
                          "reason": f"{why}, which has no GGUF block type" if gguf_type == AUTO else
                          f"{why} and its rows are not a multiple of {BLOCK}"})
    else:  # the requested type, from the dequantized values: not a fallback, but not lossless either
        requantized.append({"tensor": name, "type": want, "reason": f"{why}: re-quantized from its dequantized values"})

    def requantized_data():
        state = {k: src.get(k) for k in q.shapes(module, *shape)}
        w = q.weight(module, state, *shape)
        return _float_data(w if perm is None else w[perm], want, module + ".weight")

    return Planned(name, shape, want, requantized_data)


@dataclass
class Layout:
    """What a GGUF export of a checkpoint spends bytes on besides its matrices' data: header,
    metadata (vocabulary included) and tensor directory (``meta_bytes``, padded), and the 1-D
    tensors (F32); and the matrices themselves, by Hugging Face module name (rows, cols)."""

    meta_bytes: int
    fixed_bytes: int
    fixed_weights: int
    matrices: dict[str, tuple[int, int]]
    alignment: int = 32

    def padded(self, nbytes: int) -> int:
        return -(-nbytes // self.alignment) * self.alignment

    def file_bytes(self, matrix_bytes: dict[str, int]) -> int:
        return self.meta_bytes + self.fixed_bytes + sum(self.padded(b) for b in matrix_bytes.values())

    @property
    def weights(self) -> int:
        return self.fixed_weights + sum(r * c for r, c in self.matrices.values())


def layout(ckpt: Path) -> Layout:
    """The :class:`Layout` of ``ckpt``'s GGUF export, measured by writing its header, metadata and
    tensor directory (the part whose size does not depend on the tensor types) to a scratch file."""
    import tempfile

    import gguf

    from itera.model.checkpoint import expected_shapes, load_config
    from itera.tokenizer import Tokenizer

    cfg = load_config(ckpt)
    check_exportable(cfg)
    with TensorReader(read_headers(ckpt)) as src:
        planned, _, _ = plan_tensors(cfg, src, "F16")
    with tempfile.TemporaryDirectory(prefix="itera-gguf-layout-") as d:
        w = gguf.GGUFWriter(str(Path(d) / "h.gguf"), "llama")
        _model_metadata(w, cfg, ckpt.name, "F16")
        write_vocab(w, ckpt, Tokenizer.from_dir(ckpt), cfg)
        _write_head(w, planned)
        w.close()
        head = (Path(d) / "h.gguf").stat().st_size
        align = w.data_alignment
    lay = Layout(0, 0, 0, {}, align)
    lay.meta_bytes = lay.padded(head)
    by_name = {gguf_name(hf): hf.rsplit(".", 1)[0] for hf in expected_shapes(cfg)}
    for t in planned:
        if len(t.shape) == 2:
            lay.matrices[by_name[t.name]] = (int(t.shape[0]), int(t.shape[1]))
        else:
            lay.fixed_bytes += lay.padded(t.info()[2])
            lay.fixed_weights += int(np.prod(t.shape))
    return lay


def _write_head(w, planned) -> None:
    """Everything before the tensor data: header, metadata and the planned tensors' infos."""
    for t in planned:
        shape, dtype, nbytes, raw = t.info()
        w.add_tensor_info(t.name, shape, dtype, nbytes, raw_dtype=raw)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()


def write_gguf(ckpt: Path, out: Path, gguf_type: str) -> dict:
    """Write ``ckpt`` as a GGUF file at ``out`` (the caller makes the write atomic), one tensor at a
    time: peak memory is one tensor, not the model.

    Returns tensor types and counts, fallbacks, tensors written from codes, and the vocabulary."""
    import gguf

    from itera.model.checkpoint import load_config
    from itera.tokenizer import Tokenizer

    if gguf_type not in DIRECT_TYPES:
        raise UsageError(f"--gguf-type {gguf_type} is written by llama.cpp's quantizer, not directly")
    cfg = load_config(ckpt)
    check_exportable(cfg)
    with TensorReader(read_headers(ckpt)) as src:
        planned, fallbacks, requantized = plan_tensors(cfg, src, gguf_type)
        w = gguf.GGUFWriter(str(out), "llama")
        _model_metadata(w, cfg, ckpt.name, dominant_type(planned) if gguf_type == AUTO else gguf_type)
        vocab = write_vocab(w, ckpt, Tokenizer.from_dir(ckpt), cfg)
        _write_head(w, planned)
        for t in planned:
            w.write_tensor_data(t.produce())
        w.close()
    counts: dict[str, int] = {}
    for t in planned:
        counts[t.type] = counts.get(t.type, 0) + 1
    # AUTO keeps what quantize left in float at 16 bits: name those matrices (the embeddings, the head)
    kept = [t.name for t in planned if len(t.shape) == 2 and t.type == "F16"] if gguf_type == AUTO and cfg.quantization else []
    return {"tensor_types": counts, "fallbacks": fallbacks, "requantized": requantized,
            "direct_from_codes": sum(t.direct for t in planned), "kept_f16": kept, "vocabulary": vocab}


def llama_quantize(src: Path, dst: Path, gguf_type: str, threads: int | None = None,
                   importance: dict[str, np.ndarray] | None = None, log_dir: Path | None = None,
                   pure: bool = False) -> str:
    """Run llama.cpp's quantizer (through llama-cpp-python) from ``src`` to ``dst``, with importance
    data (GGUF tensor name -> mean square of each input column, :mod:`itera.quant.importance`)
    passed as llama.cpp's ``imatrix``. ``pure``: every matrix in ``gguf_type`` (llama-quantize's
    ``--pure``; by default llama.cpp keeps the output head wider). Its log (a line per tensor) goes
    to a file under ``$ITERA_HOME/logs``; returns that file's path."""
    import ctypes

    import llama_cpp

    from itera.runtime.llamacpp_backend import native_log

    ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{gguf_type}")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    params.nthread = threads or 0
    params.pure = pure
    if importance:
        keep = {n: np.ascontiguousarray(v, dtype=np.float32) for n, v in importance.items()}
        entries = (llama_cpp.llama_model_imatrix_data * (len(keep) + 1))()
        for e, (name, v) in zip(entries, keep.items()):
            e.name, e.size = name.encode(), v.size
            e.data = v.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
        entries[len(keep)].name = None  # the list ends with a null name
        params.imatrix = ctypes.cast(entries, ctypes.POINTER(llama_cpp.llama_model_imatrix_data))
    with native_log("llama-quantize", log_dir) as log:
        rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), params)
    if rc != 0:
        raise RuntimeError(f"llama.cpp's quantizer failed with code {rc} (log: {log})")
    return str(log)


# --------------------------------------------------------------------------- reading it back
# The reader undoes what the writer above did (its names, its q/k row order), so that the file's
# own weights are what verification compares llama.cpp against.


def gguf_state(path: Path, cfg, types: dict | None = None) -> dict:
    """Hugging Face-named float32 tensors of the weights a GGUF file holds: every tensor read back
    with gguf's reader, dequantized, q/k rows un-permuted. ``rope_freqs`` is left out (the model
    recomputes it from the config; a wrong one shows as a runtime difference)."""
    import gguf

    from itera.model.checkpoint import expected_shapes

    by_gguf = {gguf_name(hf): hf for hf in expected_shapes(cfg)}
    inverse = {"self_attn.q_proj": torch.argsort(rope_permutation(cfg.num_attention_heads, cfg.head_dim)),
               "self_attn.k_proj": torch.argsort(rope_permutation(cfg.num_key_value_heads, cfg.head_dim))}
    state = {}
    with open(path, "rb") as f:
        for t in gguf.GGUFReader(str(path)).tensors:
            if t.name not in by_gguf:
                continue
            hf = by_gguf[t.name]
            if types is not None:
                types[hf] = t.tensor_type.name
            # The bytes are read, not taken from the reader's memory map: the map's pages would stay
            # in this process's resident memory beside the float32 copies (for a 1.1B model, 2.2 GB
            # of F16 file on top of 4.4 GB of weights).
            f.seek(t.data_offset)
            raw = np.frombuffer(f.read(int(t.n_bytes)), dtype=t.data.dtype).reshape(t.data.shape)
            x = torch.from_numpy(np.array(gguf.quants.dequantize(raw, t.tensor_type), dtype=np.float32))
            del raw
            x = x.reshape(expected_shapes(cfg)[hf])
            module = hf.rsplit(".", 1)[0]
            perm = next((p for suffix, p in inverse.items() if module.endswith(suffix)), None)
            state[hf] = x[perm] if perm is not None else x
    return state


def gguf_tensor_types(path: Path) -> tuple[dict[str, int], float]:
    """{type: count} of the tensors a GGUF file really holds, and bits per weight over all of them."""
    import gguf

    counts: dict[str, int] = {}
    nbytes = elems = 0
    for t in gguf.GGUFReader(str(path)).tensors:
        counts[t.tensor_type.name] = counts.get(t.tensor_type.name, 0) + 1
        nbytes += int(t.n_bytes)
        elems += int(t.n_elements)
    return counts, nbytes * 8 / max(elems, 1)


def file_logits_gguf(path: Path, cfg, ids: list[int]) -> np.ndarray:
    """Logits of the checkpoint's model holding exactly the GGUF file's weights, every matrix
    product's input rounded as llama.cpp rounds it for that weight's type: what is left between
    this and llama.cpp is summation order, so the check stays tight however deep the model."""
    from itera.model.checkpoint import model_from_state
    from itera.storage.ggml import round_inputs_as_llama_cpp

    types: dict[str, str] = {}
    model = model_from_state(cfg, gguf_state(path, cfg, types), where=str(path))
    if "lm_head.weight" not in types:  # tied: the output product uses the embedding table
        types["lm_head.weight"] = types.get("model.embed_tokens.weight", "F32")
    for name, module in model.named_modules():
        wtype = types.get(f"{name}.weight")
        if isinstance(module, torch.nn.Linear) and wtype not in (None, "F32"):
            round_inputs_as_llama_cpp(module, wtype)
    with torch.no_grad():
        return model(torch.tensor([ids]))[0].numpy()


# --------------------------------------------------------------------------- the format's entry


def check(cfg: ModelConfig, opts) -> None:
    check_exportable(cfg)
    check_tokenizer(opts.model)
    if opts.calib and opts.gguf_type not in LLAMA_QUANT_TYPES:
        raise UsageError(f"--calib gives llama.cpp's quantizer importance data; --gguf-type {opts.gguf_type} is not "
                         f"written by it (use one of {', '.join(LLAMA_QUANT_TYPES)}), and itera's own types take "
                         "their importance data at `itera quantize`")


def write(src, opts, staging, reporter) -> dict:
    """Write the GGUF file (directly, or llama.cpp's quantizer on an F16 export) to the staged path."""
    if opts.gguf_type in DIRECT_TYPES:
        info = write_gguf(src.path, staging.main, opts.gguf_type)
        if info["kept_f16"]:
            main = max((t for t in info["tensor_types"] if t not in ("F16", "F32")), default="Q8_0",
                       key=info["tensor_types"].get)
            reporter.log(f"{len(info['kept_f16'])} matrices stay F16 ({', '.join(info['kept_f16'])}): quantize left "
                         f"them in float and --gguf-type AUTO keeps the checkpoint's types; pass --gguf-type {main} "
                         f"to write them as {main} too")
        return info
    f16 = staging.temp(".f16.gguf")
    info = write_gguf(src.path, f16, "F16")
    log = llama_quantize(f16, staging.main, opts.gguf_type, opts.threads, src.importance)
    f16.unlink()
    fallbacks = llama_fallbacks(staging.main, opts.gguf_type)
    reporter.log(f"llama.cpp's quantizer wrote {opts.gguf_type} (its log: {log})")
    return {**info, "fallbacks": info["fallbacks"] + fallbacks, "direct_from_codes": 0, "quantized_by": "llama.cpp",
            "quantizer_log": log, "importance": src.importance_figures}


def llama_fallbacks(path: Path, gguf_type: str) -> list[dict]:
    """Tensors llama.cpp's quantizer wrote with a smaller block than the requested type's (it
    does so when a row is not a multiple of the block, 256 for K-quants), read from the file."""
    import gguf

    base = gguf_type.split("_K")[0] + "_K" if "_K" in gguf_type else gguf_type
    want_block = gguf.GGML_QUANT_SIZES[getattr(gguf.GGMLQuantizationType, base)][0]
    out = []
    for t in gguf.GGUFReader(str(path)).tensors:
        if len(t.shape) < 2:
            continue
        block = gguf.GGML_QUANT_SIZES[t.tensor_type][0]
        if block < want_block:
            out.append({"tensor": t.name, "wanted": gguf_type, "written": t.tensor_type.name,
                        "reason": f"row length {int(t.shape[0])} is not a multiple of {want_block} "
                                  "(llama.cpp's quantizer chose the type)"})
    return out


def verify(src, opts, artifact: Path, info: dict):
    """llama.cpp's logits on the source's ids; the logits of the file's own weights in torch;
    tokenization of a varied text; the tensor types the file really holds."""
    from itera.export.verify import PARITY_TEXT, tokenizer_parity
    from itera.runtime import isolate, llamacpp_mode

    file_logits = file_logits_gguf(artifact, src.cfg, src.ids)  # before llama.cpp maps the file: peak memory
    types, bpw = gguf_tensor_types(artifact)
    llamacpp_mode.mode()  # probe (once per build and CPU) here, not inside the child
    # llama.cpp runs in a child process: if it crashes on this file, export fails with one line
    # naming the crash, and the staged file is removed as for any other failure.
    theirs, runtime, mode = isolate.call("itera.runtime.llamacpp_backend:tokens_and_logits", artifact, opts.threads,
                                         PARITY_TEXT, src.ids, runtime="llama.cpp",
                                         what=f"verifying the GGUF file for {opts.out}", crash_name="verify")
    llamacpp_mode.note_used(mode)
    parity, problem = tokenizer_parity(src.tokenizer.encode(PARITY_TEXT, add_bos=False), theirs, PARITY_TEXT)
    checks = {"tokenizer_parity": parity["match"], "tokenizer_parity_tokens": parity["tokens"],
              "tensor_types": types, "bits_per_weight": bpw, "file_bytes": artifact.stat().st_size}
    return runtime, file_logits, checks, [problem] if problem else []
