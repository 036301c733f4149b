"""Hugging Face-layout checkpoint directories: read, check and write.

A checkpoint is a directory with ``config.json``, ``model.safetensors`` (or shards listed in
``model.safetensors.index.json``) using Hugging Face tensor names, and ``tokenizer.json``
(+ ``tokenizer_config.json``). Weights are only ever read from safetensors: pickled
``.bin``/``.pt`` files are refused, never unpickled.

Every safetensors header is checked by hand before the library maps the file, so a truncated
file, overlapping offsets or a shape that disagrees with config.json is a one-line
:class:`CheckpointError` naming the file and tensor, not a crash inside a C extension.
"""

from __future__ import annotations

import json
import math
import shutil
import struct
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from itera.errors import CheckpointError
from itera.model.config import ModelConfig
from itera.fsio import atomic_dir

if TYPE_CHECKING:
    import torch

    from itera.model.llama import LlamaForCausalLM

WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
CONFIG_NAME = "config.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json")
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
_MAX_HEADER = 100 * 1024 * 1024  # safetensors' own limit

# safetensors dtypes: bytes per element, and torch's name for it (torch is not imported to check a header)
DTYPES = {"F64": (8, "float64"), "F32": (4, "float32"), "F16": (2, "float16"), "BF16": (2, "bfloat16"),
          "I64": (8, "int64"), "I32": (4, "int32"), "I16": (2, "int16"), "I8": (1, "int8"), "U8": (1, "uint8"),
          "U16": (2, "uint16"), "U32": (4, "uint32"), "U64": (8, "uint64"), "BOOL": (1, "bool"),
          "F8_E4M3": (1, "float8_e4m3fn"), "F8_E5M2": (1, "float8_e5m2")}
DTYPE_BYTES = {k: n for k, (n, _) in DTYPES.items()}
# Buffers that some older checkpoints saved and that are recomputed from the config.
_IGNORED_SUFFIXES = (".rotary_emb.inv_freq",)


def _refuse_pickle(path: Path) -> None:
    raise CheckpointError(
        f"{path} is a pickled PyTorch checkpoint; itera never unpickles weights — convert it to "
        "safetensors (e.g. save_pretrained(..., safe_serialization=True)) and pass the directory"
    )


def safetensors_header(path: Path) -> dict:
    """Read and check a safetensors header: size, JSON, dtypes, offsets in bounds, no overlap."""
    path = Path(path)
    size = path.stat().st_size
    if size < 8:
        raise CheckpointError(f"{path} is truncated ({size} bytes); re-copy or re-save the checkpoint")
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        if n > _MAX_HEADER or 8 + n > size:
            raise CheckpointError(
                f"{path} is truncated or corrupt: header claims {n} bytes but the file has {size}; "
                "re-copy or re-save the checkpoint"
            )
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise CheckpointError(f"{path} has a corrupt safetensors header (not JSON); re-save the checkpoint") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path} has a corrupt safetensors header (not an object)")
    data_size = size - 8 - n
    spans = []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (begin, end) = info["dtype"], info["shape"], info["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{path}: tensor {name} has a malformed header entry") from None
        if dtype not in DTYPE_BYTES:
            raise CheckpointError(f"{path}: tensor {name} has unsupported dtype {dtype}")
        if not (isinstance(shape, list) and all(isinstance(x, int) and not isinstance(x, bool) and x >= 0
                                                for x in shape)):
            raise CheckpointError(f"{path}: tensor {name} has a malformed shape {shape!r} (not a list of sizes); "
                                  "re-save the checkpoint")
        if not (isinstance(begin, int) and isinstance(end, int) and 0 <= begin <= end):
            raise CheckpointError(f"{path}: tensor {name} has invalid data offsets {[begin, end]}")
        if end > data_size:
            raise CheckpointError(
                f"{path} is truncated: tensor {name} ends at byte {end} of a {data_size}-byte data section; "
                "re-copy or re-save the checkpoint"
            )
        if end - begin != math.prod(shape) * DTYPE_BYTES[dtype]:
            raise CheckpointError(f"{path}: tensor {name} has {end - begin} bytes but shape {shape} needs "
                                  f"{math.prod(shape) * DTYPE_BYTES[dtype]}")
        spans.append((begin, end, name))
    spans.sort()
    for (b0, e0, n0), (b1, e1, n1) in zip(spans, spans[1:]):
        if b1 < e0:
            raise CheckpointError(f"{path} is corrupt: tensors {n0} and {n1} overlap in the file; re-save the checkpoint")
    return header


def weight_files(ckpt: Path) -> list[Path]:
    """The safetensors files of a checkpoint directory, validated to exist."""
    index = ckpt / INDEX_NAME
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text("utf-8"))["weight_map"]
            files = sorted(set(weight_map.values()))
        except (ValueError, KeyError, TypeError, AttributeError):
            raise CheckpointError(f"{index} is not a valid safetensors index (needs a weight_map)") from None
        for name in files:
            if "/" in name or name.startswith("."):
                raise CheckpointError(f"{index} names an invalid shard {name!r}")
            if not (ckpt / name).is_file():
                raise CheckpointError(f"{ckpt} is missing shard {name} listed in {INDEX_NAME}")
        return [ckpt / f for f in files]
    if (ckpt / WEIGHTS_NAME).is_file():
        return [ckpt / WEIGHTS_NAME]
    pickles = [p for p in sorted(ckpt.iterdir()) if p.suffix in PICKLE_SUFFIXES]
    if pickles:
        _refuse_pickle(pickles[0])
    raise CheckpointError(f"{ckpt} has no {WEIGHTS_NAME}; pass a checkpoint directory with safetensors weights")


def check_checkpoint_dir(path: Path) -> Path:
    """Cheap checks that ``path`` is a loadable checkpoint directory; returns it."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path} does not exist; pass a checkpoint directory")
    if path.is_file():
        if path.suffix in PICKLE_SUFFIXES:
            _refuse_pickle(path)
        raise CheckpointError(f"{path} is a file; pass the checkpoint directory that holds config.json")
    if not (path / CONFIG_NAME).is_file():
        raise CheckpointError(f"{path} has no config.json; pass a Hugging Face-style checkpoint directory")
    return path


def expected_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape that config.json implies (Hugging Face names)."""
    h, f, v = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
    q, kv = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (v, h), "model.norm.weight": (h,)}
    if not cfg.tie_word_embeddings:
        shapes["lm_head.weight"] = (v, h)
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        shapes.update({
            p + "self_attn.q_proj.weight": (q, h), p + "self_attn.k_proj.weight": (kv, h),
            p + "self_attn.v_proj.weight": (kv, h), p + "self_attn.o_proj.weight": (h, q),
            p + "mlp.gate_proj.weight": (f, h), p + "mlp.up_proj.weight": (f, h),
            p + "mlp.down_proj.weight": (h, f),
            p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,),
        })
        if cfg.attention_bias or cfg.qkv_bias:
            shapes.update({p + "self_attn.q_proj.bias": (q,), p + "self_attn.k_proj.bias": (kv,),
                           p + "self_attn.v_proj.bias": (kv,)})
        if cfg.attention_bias:
            shapes[p + "self_attn.o_proj.bias"] = (h,)
        if cfg.mlp_bias:
            shapes.update({p + "mlp.gate_proj.bias": (f,), p + "mlp.up_proj.bias": (f,), p + "mlp.down_proj.bias": (h,)})
    return shapes


def read_headers(ckpt: Path) -> dict[str, tuple[Path, dict]]:
    """Tensor name -> (file, header entry) over all weight files, each header validated."""
    out: dict[str, tuple[Path, dict]] = {}
    for f in weight_files(ckpt):
        for name, info in safetensors_header(f).items():
            if name == "__metadata__":
                continue
            if name in out:
                raise CheckpointError(f"{ckpt}: tensor {name} appears in both {out[name][0].name} and {f.name}")
            out[name] = (f, info)
    return out


def quantized_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Like :func:`expected_shapes`, with each quantized layer's weight replaced by its packed tensors."""
    from itera.storage.layout import layer_plan

    shapes = expected_shapes(cfg)
    for module, q in layer_plan(cfg.quantization).items():
        name = module + ".weight"
        if name not in shapes:
            raise CheckpointError(f"quantization_config names {module}, which this model does not have")
        out_f, in_f = shapes.pop(name)
        if not q.fits(in_f):
            raise CheckpointError(f"quantization_config for {module} does not fit its {in_f} input columns")
        shapes.update({k: shape for k, (shape, _) in q.shapes(module, out_f, in_f).items()})
    return shapes


def check_against_config(cfg: ModelConfig, headers: dict[str, tuple[Path, dict]], ckpt: Path) -> None:
    """Every tensor config.json implies is present with the implied shape; nothing unexplained."""
    want = quantized_shapes(cfg) if cfg.quantization else expected_shapes(cfg)
    have = {n: tuple(info["shape"]) for n, (_, info) in headers.items() if not n.endswith(_IGNORED_SUFFIXES)}
    if cfg.tie_word_embeddings:
        have.pop("lm_head.weight", None)  # some writers store the tied head anyway
    for name, shape in want.items():
        if name not in have:
            raise CheckpointError(f"{ckpt} is missing tensor {name} that config.json implies; "
                                  "the config does not match the weights")
        if have[name] != shape:
            raise CheckpointError(
                f"{ckpt}: tensor {name} has shape {list(have[name])} but config.json implies {list(shape)}; "
                "the config does not match the weights"
            )
    extra = sorted(set(have) - set(want))
    if extra:
        raise CheckpointError(f"{ckpt} has tensor {extra[0]} that config.json does not explain "
                              f"({len(extra)} unexpected in all); the config does not match the weights")


def load_checked_config(path: Path) -> tuple[ModelConfig, dict[str, tuple[Path, dict]]]:
    """config.json of a checkpoint directory, checked against its safetensors headers (cheap:
    no weights are read). Returns the config and the headers."""
    path = check_checkpoint_dir(path)
    cfg = load_config(path)
    headers = read_headers(path)
    check_against_config(cfg, headers, path)
    return cfg, headers


def checkpoint_format(path: Path) -> str:
    """The record's artifact format of a checkpoint directory: itera-quant or safetensors."""
    return "itera-quant" if load_config(path).quantization else "safetensors"


def load_config(path: Path) -> ModelConfig:
    return ModelConfig.from_file(check_checkpoint_dir(path) / CONFIG_NAME)


class TensorReader:
    """Tensors of safetensors files (headers already validated by :func:`read_headers`), each
    read with plain reads into memory of its own. The files are never memory-mapped: a mapping
    stays in the process's resident memory as long as any tensor viewing it lives (an untouched
    embedding kept the whole file resident beside its quantized copy), and a float16/bfloat16 file
    converted to float32 would sit in memory beside its conversion."""

    def __init__(self, headers: dict[str, tuple[Path, dict]]):
        if sys.byteorder != "little":
            raise CheckpointError("safetensors data is little-endian and this machine is not; itera reads it on "
                                  "little-endian machines only")
        self.headers = headers
        self._open: dict[Path, tuple] = {}

    def __contains__(self, name: str) -> bool:
        return name in self.headers

    def get(self, name: str) -> "torch.Tensor":
        import torch

        f, info = self.headers[name]
        try:
            if f not in self._open:
                fh = open(f, "rb", buffering=0)
                head = fh.read(8)
                if len(head) != 8:
                    fh.close()
                    raise CheckpointError(f"{f} changed while it was read; re-run when nothing writes to it")
                self._open[f] = (fh, 8 + struct.unpack("<Q", head)[0])
            fh, base = self._open[f]
            begin, end = info["data_offsets"]
            buf = torch.empty(end - begin, dtype=torch.uint8)
            view, done = memoryview(buf.numpy()), 0
            fh.seek(base + begin)
            while done < end - begin:  # one read returns at most about 2 GB on Linux
                got = fh.readinto(view[done:])
                if not got:
                    raise CheckpointError(f"{f} is truncated: tensor {name} ends past the end of the file; "
                                          "re-copy or re-save the checkpoint")
                done += got
        except OSError as e:
            raise CheckpointError(f"{f} could not be read ({e}); re-copy the checkpoint") from None
        return buf.view(getattr(torch, DTYPES[info["dtype"]][1])).reshape(info["shape"])

    def close(self) -> None:
        for fh, _ in self._open.values():
            fh.close()
        self._open.clear()

    def __enter__(self) -> "TensorReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def load_state_dict(ckpt: Path, headers: dict[str, tuple[Path, dict]] | None = None) -> dict[str, "torch.Tensor"]:
    headers = headers if headers is not None else read_headers(ckpt)
    with TensorReader(headers) as reader:
        return {name: reader.get(name) for name in headers}


def load_model(path: Path, dtype: "torch.dtype | str | None" = None, device: str = "cpu"
               ) -> tuple["LlamaForCausalLM", ModelConfig]:
    """Load a checkpoint directory into an itera model on ``device`` in ``dtype`` (default fp32)."""
    cfg, headers = load_checked_config(path)
    state = load_state_dict(path, headers)
    if cfg.quantization:  # dequantize: the torch backend computes with the stored weights in float
        from itera.storage.layout import layer_plan

        shapes = expected_shapes(cfg)
        for module, q in layer_plan(cfg.quantization).items():
            state[module + ".weight"] = q.weight(module, state, *shapes[module + ".weight"])
            for suffix in (".qweight", ".scales", ".zeros", ".ggml"):
                state.pop(module + suffix, None)
    return model_from_state(cfg, state, device, dtype, where=str(path)), cfg


def model_from_state(cfg: ModelConfig, state: dict[str, "torch.Tensor"], device: str = "cpu",
                     dtype: "torch.dtype | str | None" = None, where: str = "") -> "LlamaForCausalLM":
    """A model holding exactly ``state``'s float tensors (Hugging Face names). Tensors are
    assigned, not copied, and ``state`` is emptied as it goes: peak memory is one copy of the
    weights. Non-finite weights are refused naming the tensor."""
    import torch

    from itera.model.llama import LlamaForCausalLM, rope_inv_freq

    dtype = resolve_dtype(dtype)
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    params = {}
    for name in list(state):
        t = state.pop(name)
        if name.endswith(_IGNORED_SUFFIXES) or (cfg.tie_word_embeddings and name == "lm_head.weight"):
            continue
        params[name] = t.to(device=device, dtype=dtype).contiguous()
    if cfg.tie_word_embeddings:
        params["lm_head.weight"] = params["model.embed_tokens.weight"]
    try:
        model.load_state_dict(params, strict=True, assign=True)
    except RuntimeError as e:
        raise CheckpointError(f"{where}: the weights do not fit the model config.json describes "
                              f"({' '.join(str(e).split())[:200]})") from None
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    model.inv_freq = rope_inv_freq(cfg).to(device)  # a buffer, not in the state: computed from the config
    model.eval()
    check_finite(model, where)
    return model


def check_finite(model: "LlamaForCausalLM", path: Path) -> None:
    """Refuse weights holding NaN or Infinity, naming the first such tensor: nothing downstream
    (quantization, export, evaluation) can make a meaningful artifact or figure from them."""
    import torch

    for name, p in model.named_parameters():
        if not bool(torch.isfinite(p).all()):
            raise CheckpointError(f"{path}: tensor {name} holds NaN or infinite values; pass a checkpoint with "
                                  "finite weights")


def resolve_dtype(dtype: "torch.dtype | str | None") -> "torch.dtype":
    import torch

    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    names = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
             "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
    if dtype not in names:
        raise CheckpointError(f"unknown dtype {dtype!r}; use float32, bfloat16 or float16")
    return names[dtype]


SAVE_DTYPES = ("auto", "float32", "float16", "bfloat16")  # --save-dtype: auto is the source's stored dtype
_FLOAT_DTYPES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "F64": "float32"}


def stored_dtype(cfg: ModelConfig, headers: dict[str, tuple[Path, dict]]) -> str:
    """The float dtype a checkpoint's weights are stored in: the one holding most of its float
    elements in the safetensors headers (float64 counts as float32), else config.json's
    ``torch_dtype``, else float32. One of float32, float16, bfloat16."""
    count: dict[str, int] = {}
    for _, info in headers.values():
        name = _FLOAT_DTYPES.get(info["dtype"])
        if name is not None:
            count[name] = count.get(name, 0) + math.prod(info["shape"])
    if count:
        return max(count, key=count.get)
    return cfg.torch_dtype if cfg.torch_dtype in SAVE_DTYPES[1:] else "float32"


def check_save_dtype(value: str, flag: str = "--save-dtype") -> str:
    """``value`` as one of :data:`SAVE_DTYPES` (fp32, fp16, bf16 accepted); UsageError otherwise."""
    from itera.errors import UsageError

    aliases = {"fp32": "float32", "fp16": "float16", "half": "float16", "bf16": "bfloat16"}
    v = aliases.get(str(value).lower(), str(value).lower())
    if v not in SAVE_DTYPES:
        raise UsageError(f"{flag} {value!r} is not a dtype to save in; use {', '.join(SAVE_DTYPES)}")
    return v


def round_to_dtype(model: "LlamaForCausalLM", dtype: str, what: str = "model") -> None:
    """Round ``model``'s float32 parameters in place to the values ``dtype`` stores (they stay
    float32 in memory), so that what is measured next is what :func:`save_model` writes in
    ``dtype`` and what loads back. A value beyond ``dtype``'s range is refused naming the tensor."""
    import torch

    from itera.errors import UsageError

    target = resolve_dtype(dtype)
    if target == torch.float32:
        return
    with torch.no_grad():
        for name, p in model.named_parameters():
            rounded = p.detach().to(target)
            if not bool(torch.isfinite(rounded).all()) and bool(torch.isfinite(p).all()):
                raise UsageError(f"the {what}'s {name} holds values beyond what {dtype} can hold; pass "
                                 "--save-dtype float32 (or bfloat16)")
            p.copy_(rounded.to(p.dtype))


def save_model(model: "LlamaForCausalLM", out: Path, tokenizer_from: Path | None = None,
               dtype: "torch.dtype | str | None" = None, max_shard_bytes: int | None = None,
               extra_files: dict[str, str] | None = None) -> Path:
    """Write ``model`` as a Hugging Face-layout directory at ``out``, atomically.

    ``tokenizer_from`` copies tokenizer files from another checkpoint or directory;
    ``max_shard_bytes`` splits weights into ``model-0000i-of-0000n.safetensors`` shards with an
    index; ``extra_files`` are written as text next to the weights (e.g. resolved options).
    """
    cfg = model.config
    dtype = resolve_dtype(dtype) if dtype is not None else next(model.parameters()).dtype
    state = {}
    for name, t in model.state_dict().items():
        if cfg.tie_word_embeddings and name == "lm_head.weight":
            continue
        state[name] = t.detach().to("cpu", dtype).contiguous()
    config = cfg.to_dict()
    config["torch_dtype"] = str(dtype).removeprefix("torch.")
    return write_checkpoint(out, state, config, tokenizer_from, extra_files, max_shard_bytes)


def write_checkpoint(out: Path, tensors: dict[str, "torch.Tensor"], config: dict, tokenizer_from: Path | None = None,
                     extra_files: dict[str, str] | None = None, max_shard_bytes: int | None = None) -> Path:
    """Write a checkpoint directory from its tensors and config.json content, atomically: the
    one writer behind float checkpoints, quantized ones and merged adapters."""
    with atomic_dir(Path(out)) as tmp:
        _write_weights(tmp, tensors, max_shard_bytes)
        (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
        if tokenizer_from is not None:
            for fname in TOKENIZER_FILES:
                src = Path(tokenizer_from) / fname
                if src.is_file():
                    shutil.copyfile(src, tmp / fname)
        for fname, text in (extra_files or {}).items():
            (tmp / fname).write_text(text)
    return Path(out)


def _write_weights(directory: Path, state: dict[str, "torch.Tensor"], max_shard_bytes: int | None) -> None:
    """model.safetensors, or shards of at most ``max_shard_bytes`` plus their index."""
    from safetensors.torch import save_file

    if max_shard_bytes is None:
        save_file(state, str(directory / WEIGHTS_NAME), metadata={"format": "pt"})
        return
    shards: list[dict] = [{}]
    size = 0
    for name, t in state.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    weight_map = {}
    for i, shard in enumerate(shards, 1):
        fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(directory / fname), metadata={"format": "pt"})
        weight_map.update({name: fname for name in shard})
    total = sum(t.numel() * t.element_size() for t in state.values())
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (directory / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")


def weight_bytes(ckpt: Path) -> int:
    """Bytes of a checkpoint's weight files."""
    return sum(f.stat().st_size for f in weight_files(Path(ckpt)))
