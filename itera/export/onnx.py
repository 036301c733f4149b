"""ONNX export for onnxruntime.

Two graphs from one checkpoint: ``FILE`` maps ``input_ids`` (batch, seq) to ``logits``
(batch, seq, vocab); ``FILE`` with ``.kv.onnx`` in place of ``.onnx`` also takes
``past_key_<i>``/``past_value_<i>`` (batch, kv_heads, past, head_dim) and returns the
``present_*`` caches, for token-by-token generation. Batch, sequence and past lengths are
dynamic. The tokenizer goes into the file's metadata so the .onnx file is self-contained.
Optional weight quantization with onnxruntime's tools: ``int8`` (dynamic quantization of
MatMul weights) or ``int4`` (MatMulNBits, 4-bit blocks of 32, symmetric).
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch

from itera.model.llama import KVCache

OPSET = 17
ONNX_QUANT = ("int8", "int4")


class _Logits(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids):
        return self.model(input_ids)


class _WithCache(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, *past):
        cache = KVCache([(past[2 * i], past[2 * i + 1]) for i in range(len(past) // 2)])
        logits = self.model(input_ids, cache=cache)
        return (logits, *[t for kv in cache.layers for t in kv])


def kv_path(out: Path) -> Path:
    return Path(str(out)[: -len(".onnx")] + ".kv.onnx") if str(out).endswith(".onnx") else Path(str(out) + ".kv.onnx")


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
    wrapped = _Logits(model).eval()
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
