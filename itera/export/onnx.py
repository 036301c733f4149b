"""ONNX export for onnxruntime.

Two graphs from one checkpoint: ``FILE`` maps ``input_ids`` (batch, seq) to ``logits``
(batch, seq, vocab); ``FILE`` with ``.kv.onnx`` in place of ``.onnx`` also takes
``past_key_<i>``/``past_value_<i>`` (batch, kv_heads, past, head_dim) and returns the
``present_*`` caches, for token-by-token generation. Batch, sequence and past lengths are
dynamic. The tokenizer goes into the file's metadata so the .onnx file is self-contained.
Optional weight quantization with onnxruntime's tools: ``int8`` (dynamic quantization of
MatMul weights) or ``int4`` (MatMulNBits, 4-bit blocks of 32, symmetric).

:func:`write` and :func:`verify` are this format's entry in :data:`itera.export.job.FORMATS`.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch

from itera.export.torchfmt import LogitsOnly
from itera.model.llama import KVCache
from itera.runtime.onnx_backend import kv_path

OPSET = 17
ONNX_QUANT = ("int8", "int4")
KV_CHECK_PROMPT, KV_CHECK_NEW = 8, 16  # greedy tokens from the KV graph checked against torch


class _WithCache(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, *past):
        cache = KVCache([(past[2 * i], past[2 * i + 1]) for i in range(len(past) // 2)])
        logits = self.model(input_ids, cache=cache)
        return (logits, *[t for kv in cache.layers for t in kv])


def _embed_tokenizer(path: Path, ckpt: Path, cfg) -> None:
    import onnx

    m = onnx.load(str(path))
    meta = {"itera.tokenizer.json": (ckpt / "tokenizer.json").read_text("utf-8"),
            "itera.max_position_embeddings": str(cfg.max_position_embeddings),
            "itera.num_hidden_layers": str(cfg.num_hidden_layers)}
    if (ckpt / "tokenizer_config.json").is_file():
        meta["itera.tokenizer_config.json"] = (ckpt / "tokenizer_config.json").read_text("utf-8")
    for k, v in meta.items():
        m.metadata_props.append(onnx.StringStringEntryProto(key=k, value=v))
    onnx.save(m, str(path))


def _quantize(path: Path, mode: str) -> None:
    tmp = path.with_name(path.name + ".q.onnx")
    if mode == "int8":
        from onnxruntime.quantization import QuantType, quantize_dynamic

        quantize_dynamic(str(path), str(tmp), weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul"])
    else:
        import onnx
        from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

        q = MatMulNBitsQuantizer(onnx.load(str(path)), block_size=32, is_symmetric=True)
        q.process()
        q.model.save_model_to_file(str(tmp))
    tmp.replace(path)


def write_onnx(model, cfg, ckpt: Path, out: Path, kv_out: Path, quant: str | None = None) -> None:
    """Export ``model`` (float, eval mode) to ``out`` and its KV-cache variant to ``kv_out``."""
    wrapped = LogitsOnly(model).eval()
    x = torch.zeros(1, 8, dtype=torch.long)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # the legacy exporter's deprecation and tracer notices
        torch.onnx.export(wrapped, (x,), str(out), input_names=["input_ids"], output_names=["logits"],
                          dynamic_axes={"input_ids": {0: "batch", 1: "seq"}, "logits": {0: "batch", 1: "seq"}},
                          opset_version=OPSET, dynamo=False)
        L, nkv, hd = cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim
        past = [torch.zeros(1, nkv, 3, hd) for _ in range(2 * L)]
        names_in = [f"past_{kind}_{i}" for i in range(L) for kind in ("key", "value")]
        names_out = [f"present_{kind}_{i}" for i in range(L) for kind in ("key", "value")]
        axes = {"input_ids": {0: "batch", 1: "seq"}, "logits": {0: "batch", 1: "seq"}}
        axes.update({n: {0: "batch", 2: "past"} for n in names_in})
        axes.update({n: {0: "batch", 2: "total"} for n in names_out})
        torch.onnx.export(_WithCache(model).eval(), (x[:, :1], *past), str(kv_out),
                          input_names=["input_ids", *names_in], output_names=["logits", *names_out],
                          dynamic_axes=axes, opset_version=OPSET, dynamo=False)
    for p in (out, kv_out):
        if quant:
            _quantize(p, quant)
        _embed_tokenizer(p, ckpt, cfg)


# --------------------------------------------------------------------------- the format's entry


def check(cfg, opts) -> None:
    pass


def write(src, opts, staging, reporter) -> dict:
    """The logits graph at the staged path and the KV-cache graph beside it (renamed together)."""
    kv_tmp = staging.temp(".kv.onnx", final=kv_path(opts.out))
    write_onnx(src.model, src.cfg, src.path, staging.main, kv_tmp, opts.onnx_quant)
    return {"kv_graph": kv_tmp}


def _torch_greedy(model, prompt: list[int], n: int) -> list[int]:
    seq, out = list(prompt), []
    with torch.no_grad():
        for _ in range(n):
            out.append(int(model(torch.tensor([seq]))[0, -1].argmax()))
            seq.append(out[-1])
    return out


def verify(src, opts, artifact: Path, info: dict) -> tuple[np.ndarray, dict, list[str]]:
    """onnxruntime's logits on the source's ids, and greedy tokens from the KV graph against torch's."""
    from itera.runtime.base import greedy
    from itera.runtime.onnx_backend import OnnxRuntime, OnnxStepper

    kv_graph = info.pop("kv_graph")
    with OnnxRuntime(artifact, threads=opts.threads) as rt:
        got = rt.logits(src.ids)
    prompt = src.ids[:KV_CHECK_PROMPT]
    kv_tokens = greedy(OnnxStepper(kv_graph, opts.threads), prompt, KV_CHECK_NEW)
    ref_tokens = _torch_greedy(src.model, prompt, KV_CHECK_NEW)
    agreement = sum(a == b for a, b in zip(kv_tokens, ref_tokens)) / KV_CHECK_NEW
    problems = [f"kv greedy agreement {agreement}"] if agreement < 1.0 and not opts.onnx_quant else []
    return got, {"kv_greedy_agreement": agreement}, problems
