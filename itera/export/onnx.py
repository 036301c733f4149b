"""ONNX export for onnxruntime.

Two graphs from one checkpoint: ``FILE`` maps ``input_ids`` (batch, seq) to ``logits``
(batch, seq, vocab); ``FILE`` with ``.kv.onnx`` in place of ``.onnx`` also takes
``past_key_<i>``/``past_value_<i>`` (batch, kv_heads, past, head_dim) and returns the
``present_*`` caches, for token-by-token generation. Batch, sequence and past lengths are
dynamic. The tokenizer goes into the file's metadata so the .onnx file is self-contained.
Optional weight quantization with onnxruntime's tools: ``int8`` (dynamic quantization of
MatMul weights) or ``int4`` (MatMulNBits, 4-bit blocks of 32, symmetric).

:func:`write` and :func:`verify` are this format's entry in :data:`itera.export.formats.FORMATS`.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch

from itera.errors import UnsupportedModelError
from itera.export.trace import LogitsOnly, check_traceable
from itera.model.llama import KVCache
from itera.artifacts import kv_path

OPSET = 17
ONNX_QUANT = ("int8", "int4")
KV_CHECK_PROMPT, KV_CHECK_NEW = 8, 16  # greedy tokens from the KV graph checked against torch
LARGE = 1_800_000_000  # weight bytes past which graphs keep their tensors in a .data file (protobuf stops at 2 GB)


class _WithCache(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, *past):
        cache = KVCache([(past[2 * i], past[2 * i + 1]) for i in range(len(past) // 2)])
        logits = self.model(input_ids, cache=cache)
        return (logits, *[t for kv in cache.layers for t in kv])


def _metadata(ckpt: Path, cfg) -> dict[str, str]:
    """What travels inside the file: the tokenizer (and its config, chat template included), the context."""
    meta = {"itera.tokenizer.json": (ckpt / "tokenizer.json").read_text("utf-8"),
            "itera.max_position_embeddings": str(cfg.max_position_embeddings),
            "itera.num_hidden_layers": str(cfg.num_hidden_layers)}
    if (ckpt / "tokenizer_config.json").is_file():
        text = (ckpt / "tokenizer_config.json").read_text("utf-8")
        meta["itera.tokenizer_config.json"] = text
        template = json.loads(text).get("chat_template")
        if template:
            meta["itera.chat_template"] = template if isinstance(template, str) else json.dumps(template)
    return meta


def _quantize(model, mode: str, work: Path):
    """Weight quantization with onnxruntime's tools; returns the quantized ModelProto."""
    import onnx

    if mode == "int4":
        from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

        q = MatMulNBitsQuantizer(model, block_size=32, is_symmetric=True)
        q.process()
        return q.model.model
    from onnxruntime.quantization import QuantType, quantize_dynamic

    src, dst = work / "float.onnx", work / "int8.onnx"
    onnx.save(model, str(src))
    quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul"])
    return onnx.load(str(dst))


def _finish(raw: Path, dest: Path, meta: dict[str, str], quant: str | None, external: bool) -> list[Path]:
    """The exporter's graph (``raw``, tensors possibly in files beside it) saved as ``dest`` with
    the metadata, weights quantized if asked, and past protobuf's 2 GB limit in one external
    data file ``dest.name + '.data'`` beside it. Returns the files written."""
    import onnx

    model = onnx.load(str(raw))
    if quant:
        model = _quantize(model, quant, raw.parent)
    for k, v in meta.items():
        model.metadata_props.append(onnx.StringStringEntryProto(key=k, value=v))
    if not external:
        onnx.save(model, str(dest))
        return [dest]
    onnx.save_model(model, str(dest), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=dest.name + ".data", size_threshold=1024)
    return [dest, dest.with_name(dest.name + ".data")]


def write_onnx(model, cfg, ckpt: Path, out: Path, kv_out: Path, quant: str | None = None, work: Path | None = None
               ) -> list[Path]:
    """Export ``model`` (float, eval mode) to ``out`` and its KV-cache variant to ``kv_out``; returns
    every file written (with ``.data`` files for models past 2 GB). ``work`` holds the exporter's
    own output (its directory of tensor files, for large models) and is the caller's to remove."""
    import tempfile

    work = Path(work or tempfile.mkdtemp())
    external = sum(p.numel() * p.element_size() for p in model.parameters()) > LARGE
    if external and quant:
        raise UnsupportedModelError(f"--onnx-quant {quant} of a model past 2 GB is not supported; export it "
                                    "without --onnx-quant, or as GGUF")
    meta = _metadata(ckpt, cfg)
    x = torch.zeros(1, 8, dtype=torch.long)
    written = []
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # the legacy exporter's deprecation and tracer notices
        (work / "logits").mkdir()
        torch.onnx.export(LogitsOnly(model).eval(), (x,), str(work / "logits" / "g.onnx"), input_names=["input_ids"],
                          output_names=["logits"], opset_version=OPSET, dynamo=False,
                          dynamic_axes={"input_ids": {0: "batch", 1: "seq"}, "logits": {0: "batch", 1: "seq"}})
        written += _finish(work / "logits" / "g.onnx", out, meta, quant, external)
        L, nkv, hd = cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim
        past = [torch.zeros(1, nkv, 3, hd) for _ in range(2 * L)]
        names_in = [f"past_{kind}_{i}" for i in range(L) for kind in ("key", "value")]
        names_out = [f"present_{kind}_{i}" for i in range(L) for kind in ("key", "value")]
        axes = {"input_ids": {0: "batch", 1: "seq"}, "logits": {0: "batch", 1: "seq"}}
        axes.update({n: {0: "batch", 2: "past"} for n in names_in})
        axes.update({n: {0: "batch", 2: "total"} for n in names_out})
        (work / "kv").mkdir()
        torch.onnx.export(_WithCache(model).eval(), (x[:, :1], *past), str(work / "kv" / "g.onnx"),
                          input_names=["input_ids", *names_in], output_names=["logits", *names_out],
                          dynamic_axes=axes, opset_version=OPSET, dynamo=False)
        written += _finish(work / "kv" / "g.onnx", kv_out, meta, quant, external)
    return written


# --------------------------------------------------------------------------- the format's entry


def write(src, opts, staging, reporter) -> dict:
    """Both graphs (and their external data, past 2 GB) in a private directory beside the output,
    under their final names, so that the files refer to each other as they will; the staging
    renames them all into place after verification."""
    private = staging.private()
    final_kv = kv_path(opts.out)
    files = write_onnx(src.model, src.cfg, src.path, private / opts.out.name, private / final_kv.name,
                       opts.onnx_quant, work=staging.private())
    for f in files:
        staging.stage(f, opts.out.parent / f.name, main=f.name == opts.out.name)
    return {"kv_graph": private / final_kv.name, "external_data": any(f.suffix == ".data" for f in files)}


def _torch_greedy(model, prompt: list[int], n: int) -> list[int]:
    seq, out = list(prompt), []
    with torch.no_grad():
        for _ in range(n):
            out.append(int(model(torch.tensor([seq]))[0, -1].argmax()))
            seq.append(out[-1])
    return out


def verify(src, opts, artifact: Path, info: dict):
    """onnxruntime's logits on the source's ids (float graphs hold the source's weights, so those
    are the reference; quantized graphs also quantize activations, so they have none), greedy
    tokens from the KV graph against torch's, and the embedded tokenizer's parity."""
    from itera.export.verify import PARITY_TEXT, tokenizer_parity
    from itera.runtime.base import greedy
    from itera.runtime.onnx_backend import OnnxRuntime, OnnxStepper

    kv_graph = info.pop("kv_graph")
    with OnnxRuntime(artifact, threads=opts.threads) as rt:
        runtime = rt.logits(src.ids)
        parity, problem = tokenizer_parity(src.tokenizer.encode(PARITY_TEXT, add_bos=False),
                                           rt.tokenizer.encode(PARITY_TEXT, add_bos=False), PARITY_TEXT)
    prompt = src.ids[:KV_CHECK_PROMPT]
    kv_tokens = greedy(OnnxStepper(kv_graph, opts.threads), prompt, KV_CHECK_NEW)
    ref_tokens = _torch_greedy(src.model, prompt, KV_CHECK_NEW)
    agreement = sum(a == b for a, b in zip(kv_tokens, ref_tokens)) / KV_CHECK_NEW
    problems = [problem] if problem else []
    if agreement < 1.0 and not opts.onnx_quant:
        problems.append(f"kv greedy agreement {agreement}")
    checks = {"kv_greedy_agreement": agreement, "tokenizer_parity": parity["match"],
              "tokenizer_parity_tokens": parity["tokens"]}
    return runtime, None if opts.onnx_quant else src.ref, checks, problems
