"""GGUF export for llama.cpp, written with the ``gguf`` package.

Architecture ``llama``: Hugging Face's rotary layout (rotate-half) is turned into llama.cpp's
(interleaved pairs) by permuting the rows of q_proj and k_proj, as llama.cpp's own converter
does. Llama-3 rope scaling goes in a ``rope_freqs`` tensor of per-frequency factors; linear
scaling in metadata. The tokenizer goes in as llama.cpp's ``gpt2`` model (byte-level BPE) or
its ``llama`` model (SentencePiece-style BPE with byte fallback), so llama.cpp splits and
merges text exactly as itera does.

Tensor types: F32, F16, BF16, Q8_0, Q4_0 directly; 1-D tensors are always F32, and a 2-D tensor
whose rows are not a multiple of 32 falls back to F16 (listed in the result). From an itera
checkpoint quantized symmetrically with group size 32, 4-bit layers become Q4_0 and 8-bit
layers Q8_0 blocks straight from their codes and scales (no re-quantization). Tensors that
were not quantized in the source stay F16. llama.cpp's K-quants come from llama.cpp's own
quantizer run on an F16 export (:func:`llama_quantize`).

:func:`write` and :func:`verify` are this format's entry in :data:`itera.export.job.FORMATS`.
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import numpy as np
import torch

from itera.errors import UnsupportedModelError, UsageError
from itera.model.config import ModelConfig

DIRECT_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0")
# llama.cpp's quantizer, run through llama-cpp-python on an F16 file.
LLAMA_QUANT_TYPES = ("Q4_K_M", "Q4_K_S", "Q5_K_M", "Q5_K_S", "Q6_K", "Q3_K_M", "Q2_K", "Q4_1", "Q5_0", "Q5_1")
GGUF_TYPES = DIRECT_TYPES + LLAMA_QUANT_TYPES
BLOCK = 32
BYTE_TOKEN = re.compile(r"^<0x[0-9A-F]{2}>$")

_LAYER_NAMES = {
    "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
}
_FIXED_NAMES = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
                "lm_head.weight": "output.weight"}


def gguf_name(hf: str) -> str:
    """Hugging Face tensor name -> llama.cpp's."""
    if hf in _FIXED_NAMES:
        return _FIXED_NAMES[hf]
    _, _, i, rest = hf.split(".", 3)  # model.layers.{i}.{rest}
    if rest in _LAYER_NAMES:
        return f"blk.{i}.{_LAYER_NAMES[rest]}"
    module, kind = rest.rsplit(".", 1)
    return f"blk.{i}.{_LAYER_NAMES[module]}.{kind}"


def rope_permutation(n_head: int, head_dim: int) -> torch.Tensor:
    """Row order that turns rotate-half q/k projections into llama.cpp's interleaved layout."""
    rows = torch.arange(n_head * head_dim)
    return rows.reshape(n_head, 2, head_dim // 2).transpose(1, 2).reshape(-1)


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
    w.add_file_type(getattr(gguf.LlamaFileType, "ALL_F32" if gguf_type == "F32" else f"MOSTLY_{gguf_type}"))
    if cfg.rope_type == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(float(cfg.rope_scaling["factor"]))


def _tokenizer_metadata(w, ckpt: Path, tok) -> None:
    """Embed the tokenizer: byte-level BPE as llama.cpp's ``gpt2`` model, SentencePiece-style BPE
    with byte fallback as its ``llama`` model; then the special-token ids."""
    tj = json.loads((ckpt / "tokenizer.json").read_text("utf-8"))
    model = tj.get("model", {})
    pre = tj.get("pre_tokenizer") or {}
    if model.get("type") != "BPE":
        raise UnsupportedModelError(f"GGUF export supports BPE tokenizers; this one is {model.get('type')}")
    spm = bool(model.get("byte_fallback"))
    if not spm and pre.get("type") != "ByteLevel":
        raise UnsupportedModelError("GGUF export supports byte-level BPE (GPT-2 style) and SentencePiece-style BPE "
                                    f"with byte fallback; this BPE has pre-tokenizer {pre.get('type')}")
    vocab = tok.backend.get_vocab(with_added_tokens=True)
    tokens = [""] * (max(vocab.values()) + 1)
    for text, i in vocab.items():
        tokens[i] = text
    added = {t["id"]: t for t in tj.get("added_tokens", [])}
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    (_spm_vocab if spm else _gpt2_vocab)(w, tokens, added, merges, model.get("unk_token"), vocab)
    if tok.bos_id is not None:
        w.add_bos_token_id(tok.bos_id)
    if tok.eos_id is not None:
        w.add_eos_token_id(tok.eos_id)
    w.add_add_bos_token(bool(tok.add_bos))
    w.add_add_eos_token(False)


def _gpt2_vocab(w, tokens: list[str], added: dict, merges: list[str], unk, vocab: dict) -> None:
    import gguf

    types = [gguf.TokenType.CONTROL if added.get(i, {}).get("special") else
             gguf.TokenType.USER_DEFINED if i in added else gguf.TokenType.NORMAL for i in range(len(tokens))]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt-2")  # llama.cpp: LLAMA_VOCAB_PRE_TYPE_GPT2, the GPT-2 split regex
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)


def _spm_vocab(w, tokens: list[str], added: dict, merges: list[str], unk, vocab: dict) -> None:
    """SPM scores are minus the rank of the merge that made each token, so llama.cpp's
    highest-score-first merging replays the BPE merge order."""
    import gguf

    rank = {m.replace(" ", ""): r for r, m in reversed(list(enumerate(merges)))}
    types, scores = [], []
    for i, t in enumerate(tokens):
        if t == unk:
            types.append(gguf.TokenType.UNKNOWN)
        elif BYTE_TOKEN.match(t):
            types.append(gguf.TokenType.BYTE)
        elif added.get(i, {}).get("special"):
            types.append(gguf.TokenType.CONTROL)
        else:
            types.append(gguf.TokenType.NORMAL)
        scores.append(-float(rank[t]) if t in rank else 0.0)
    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_add_space_prefix(True)
    if unk is not None and unk in vocab:
        w.add_unk_token_id(vocab[unk])


# --------------------------------------------------------------------------- tensors


class _Tensors:
    """Adds tensors to the writer, counting types and recording every fallback."""

    def __init__(self, w, gguf_type: str):
        self.w, self.gguf_type = w, gguf_type
        self.counts: dict[str, int] = {}
        self.fallbacks: list[dict] = []
        self.direct = 0

    def add(self, name: str, data: np.ndarray, raw, type_name: str) -> None:
        self.counts[type_name] = self.counts.get(type_name, 0) + 1
        self.w.add_tensor(name, data, raw_dtype=raw)

    def add_float(self, name: str, x: torch.Tensor, want: str) -> None:
        import gguf

        x = x.float()
        if x.ndim == 1 or want == "F32":
            self.add(name, x.numpy().astype(np.float32), None, "F32")
            return
        if want in ("Q8_0", "Q4_0") and x.shape[-1] % BLOCK:
            self.fallbacks.append({"tensor": name, "wanted": want, "written": "F16",
                                   "reason": f"row length {x.shape[-1]} is not a multiple of {BLOCK}"})
            want = "F16"
        if want == "F16":
            self.add(name, x.numpy().astype(np.float16), None, "F16")
        else:
            t = getattr(gguf.GGMLQuantizationType, want)
            self.add(name, gguf.quants.quantize(x.numpy().astype(np.float32), t), t, want)

    def add_quantized(self, name: str, codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, q) -> None:
        """A layer itera quantized: blocks straight from its codes when they fit the requested
        type, else the dequantized weight re-quantized to it (a listed fallback)."""
        import gguf

        from itera.quant.formats import dequantize, ggml_blocks

        block_type = {4: "Q4_0", 8: "Q8_0"}.get(q.bits)
        if q.sym and q.group_size == BLOCK and block_type == self.gguf_type:
            self.add(name, ggml_blocks(codes, scales, q.bits), getattr(gguf.GGMLQuantizationType, block_type),
                     block_type)
            self.direct += 1
            return
        if zeros is None:
            zeros = torch.full(scales.shape, 2 ** (q.bits - 1))
        self.fallbacks.append({"tensor": name, "wanted": self.gguf_type, "written": self.gguf_type,
                               "reason": f"source is {q.bits}-bit group {q.group_size} "
                                         f"{'sym' if q.sym else 'asym'}: re-quantized from its dequantized values"})
        self.add_float(name, dequantize(codes, scales, zeros), self.gguf_type)


def _read_tensors(ckpt: Path) -> dict[str, torch.Tensor]:
    from safetensors import safe_open

    from itera.model.checkpoint import weight_files

    tensors = {}
    for f in weight_files(ckpt):
        with safe_open(str(f), framework="pt") as st:
            for k in st.keys():
                tensors[k] = st.get_tensor(k)
    return tensors


def _add_weights(out: _Tensors, cfg: ModelConfig, tensors: dict[str, torch.Tensor]) -> None:
    """Every weight and bias config.json implies; q/k rows (and q/k biases) permuted to llama.cpp's rope layout."""
    from itera.model.checkpoint import expected_shapes
    from itera.quant.formats import layer_plan, unpack

    plan = layer_plan(cfg.quantization) if cfg.quantization else {}
    perms = {"self_attn.q_proj": rope_permutation(cfg.num_attention_heads, cfg.head_dim),
             "self_attn.k_proj": rope_permutation(cfg.num_key_value_heads, cfg.head_dim)}
    shapes = expected_shapes(cfg)
    for name in shapes:
        module = name.rsplit(".", 1)[0]
        perm = next((p for suffix, p in perms.items() if module.endswith(suffix)), None)
        if module in plan:
            q = plan[module]
            codes = unpack(tensors[module + ".qweight"], q.bits, shapes[name][1])
            scales, zeros = tensors[module + ".scales"], tensors.get(module + ".zeros")
            if perm is not None:
                codes, scales = codes[perm], scales[perm]
                zeros = zeros[perm] if zeros is not None else None
            out.add_quantized(gguf_name(name), codes, scales, zeros, q)
            continue
        x = tensors[name] if perm is None else tensors[name][perm]
        want = out.gguf_type
        if cfg.quantization and x.ndim == 2:
            want = "F16" if out.gguf_type != "F32" else "F32"  # not quantized in the source: keep 16-bit
        out.add_float(gguf_name(name), x, want)
    if cfg.rope_type == "llama3":
        from itera.model.llama import rope_inv_freq

        # llama.cpp divides each rotary frequency by its factor: unscaled / scaled.
        factors = (rope_inv_freq(dataclasses.replace(cfg, rope_scaling=None)) / rope_inv_freq(cfg)).float()
        out.add("rope_freqs.weight", factors.numpy().astype(np.float32), None, "F32")


def write_gguf(ckpt: Path, out: Path, gguf_type: str) -> dict:
    """Write ``ckpt`` as a GGUF file at ``out`` (the caller makes the write atomic).

    Returns {"tensor_types": {type: count}, "fallbacks": [...], "direct_from_codes": n}.
    """
    import gguf

    from itera.model.checkpoint import load_config
    from itera.tokenizer import Tokenizer

    if gguf_type not in DIRECT_TYPES:
        raise UsageError(f"--gguf-type {gguf_type} is written by llama.cpp's quantizer, not directly")
    cfg = load_config(ckpt)
    check_exportable(cfg)
    w = gguf.GGUFWriter(str(out), "llama")
    _model_metadata(w, cfg, ckpt.name, gguf_type)
    _tokenizer_metadata(w, ckpt, Tokenizer.from_dir(ckpt))
    tensors = _Tensors(w, gguf_type)
    _add_weights(tensors, cfg, _read_tensors(ckpt))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return {"tensor_types": tensors.counts, "fallbacks": tensors.fallbacks, "direct_from_codes": tensors.direct}


def llama_quantize(src: Path, dst: Path, gguf_type: str, threads: int | None = None) -> None:
    """Run llama.cpp's quantizer (through llama-cpp-python) from ``src`` to ``dst``."""
    import llama_cpp

    ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{gguf_type}")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    params.nthread = threads or 0
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), params)
    if rc != 0:
        raise RuntimeError(f"llama.cpp's quantizer failed with code {rc}")


# --------------------------------------------------------------------------- the format's entry


def check(cfg: ModelConfig, opts) -> None:
    check_exportable(cfg)


def write(src, opts, staging, reporter) -> dict:
    """Write the GGUF file (directly, or llama.cpp's quantizer on an F16 export) to the staged path."""
    if opts.gguf_type in DIRECT_TYPES:
        return write_gguf(src.path, staging.main, opts.gguf_type)
    f16 = staging.temp(".f16.gguf")
    info = write_gguf(src.path, f16, "F16")
    reporter.log(f"running llama.cpp's quantizer to {opts.gguf_type}")
    llama_quantize(f16, staging.main, opts.gguf_type, opts.threads)
    return {"tensor_types": None, "fallbacks": info["fallbacks"], "direct_from_codes": 0, "quantized_by": "llama.cpp"}


def verify(src, opts, artifact: Path, info: dict) -> tuple[np.ndarray, dict, list[str]]:
    """llama.cpp's logits on the source's ids, and whether it tokenizes the verify text alike."""
    from itera.runtime.llamacpp_backend import LlamaCppRuntime

    with LlamaCppRuntime(artifact, threads=opts.threads) as rt:
        ours = src.tokenizer.encode(src.verify_text, add_bos=False)
        parity = rt.tokenizer.encode(src.verify_text, add_bos=False) == ours
        return rt.logits(src.ids), {"tokenizer_parity": parity}, [] if parity else ["tokenizer mismatch"]
