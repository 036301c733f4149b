"""``itera export``: write an artifact for a runtime, then prove the runtime agrees with the source.

After writing, the artifact is loaded in its runtime (llama.cpp, onnxruntime, torch.export,
TorchScript), fed the same token ids as the source model, and the logits compared: max and
mean absolute difference and top-1 agreement. Beyond the tolerance of the artifact's type the
export fails and the artifact is removed, unless ``allow_mismatch``; the figures are kept either way.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from itera.errors import InputError, IteraError, UsageError

FORMATS = ("gguf", "onnx", "pt2", "torchscript")
SUFFIX = {"gguf": ".gguf", "onnx": ".onnx", "pt2": ".pt2", "torchscript": ".pt"}
# Checked against the source model's logits on the same ids: max |diff| for float types, top-1
# agreement for quantized ones (whose logits move by design).
MAX_ABS = {"F32": 1e-3, "F16": 5e-2, "BF16": 0.25, "onnx": 1e-4, "pt2": 1e-4, "torchscript": 1e-4}
MIN_TOP1 = {"Q8_0": 0.9, "int8": 0.8, "Q4_0": 0.6, "int4": 0.6}
DEFAULT_MIN_TOP1 = 0.6  # llama.cpp's K-quants and other low-bit types
VERIFY_TEXT = (
    "The river ran past the old mill, and the miller counted sacks of flour by lamplight. "
    "Return the number of items in the list, or raise ValueError if the list is empty. "
    "Eine kleine Nachtmusik; une petite phrase; una frase corta; 北京的秋天; Привет, мир! "
    "def area(r):\n    return 3.14159 * r ** 2\n"
)


class VerificationError(IteraError):
    """The runtime disagreed with the source model beyond the tolerance."""

    exit_code = 1


@dataclass
class ExportOptions:
    model: Path
    out: Path
    format: str
    gguf_type: str = "F16"
    onnx_quant: str | None = None
    allow_mismatch: bool = False
    verify_tokens: int = 128
    threads: int | None = None
    max_logit_diff: float | None = None  # overrides the type's tolerance

    def validate(self) -> "ExportOptions":
        from itera.export.gguf import GGUF_TYPES
        from itera.export.onnx import ONNX_QUANT

        if self.format not in FORMATS:
            raise UsageError(f"unknown --format {self.format!r}; use gguf, onnx, pt2 or torchscript")
        if self.format == "gguf" and self.gguf_type not in GGUF_TYPES:
            raise UsageError(f"unknown --gguf-type {self.gguf_type!r}; use one of {', '.join(GGUF_TYPES)}")
        if self.onnx_quant is not None and (self.format != "onnx" or self.onnx_quant not in ONNX_QUANT):
            raise UsageError("--onnx-quant takes int8 or int4 and goes with --format onnx")
        if not self.out.parent.is_dir():
            raise UsageError(f"the directory of --out {self.out} does not exist; create {self.out.parent} first")
        if self.out.is_dir():
            raise UsageError(f"--out {self.out} is a directory; pass a file name like model{SUFFIX[self.format]}")
        if self.verify_tokens < 2:
            raise UsageError("--verify-tokens must be at least 2")
        return self

    def tolerance(self) -> dict:
        if self.max_logit_diff is not None:
            return {"max_abs_logit_diff": self.max_logit_diff}
        kind = self.gguf_type if self.format == "gguf" else (self.onnx_quant or self.format)
        if kind in MAX_ABS:
            return {"max_abs_logit_diff": MAX_ABS[kind]}
        return {"min_top1_agreement": MIN_TOP1.get(kind, DEFAULT_MIN_TOP1)}

    def as_params(self) -> dict:
        d = asdict(self)
        d["model"], d["out"] = str(self.model), str(self.out)
        return d


def compare(ref: np.ndarray, got: np.ndarray) -> dict:
    diff = np.abs(ref.astype(np.float64) - got.astype(np.float64))
    return {"max_abs_logit_diff": float(diff.max()), "mean_abs_logit_diff": float(diff.mean()),
            "top1_agreement": float((ref.argmax(-1) == got.argmax(-1)).mean())}


def _tmp_beside(path: Path, suffix: str) -> Path:
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.tmp-", suffix=suffix, dir=path.parent)
    os.close(fd)
    return Path(name)


def run_export(opts: ExportOptions, log=lambda msg: None) -> dict:
    from itera.model.checkpoint import check_against_config, load_config, load_model, read_headers
    from itera.tokenizer import Tokenizer

    opts.validate()
    cfg = load_config(opts.model)
    check_against_config(cfg, read_headers(opts.model), opts.model)
    if not (Path(opts.model) / "tokenizer.json").is_file():
        raise InputError(f"{opts.model} has no tokenizer.json; an export carries the tokenizer, so add the "
                         "model's tokenizer.json to the checkpoint")
    if opts.format == "gguf":
        from itera.export.gguf import check_exportable

        check_exportable(cfg)
    tok = Tokenizer.from_dir(opts.model)
    ids = tok.encode(VERIFY_TEXT * 4, add_bos=False)[: min(opts.verify_tokens, cfg.max_position_embeddings)]
    model, _ = load_model(opts.model)
    with torch.no_grad():
        ref = model(torch.tensor([ids]))[0].numpy()

    out = Path(opts.out)
    extra_outputs: list[Path] = []
    info: dict = {}
    tmp = _tmp_beside(out, SUFFIX[opts.format])
    tmps = [tmp]
    try:
        if opts.format == "gguf":
            from itera.export.gguf import DIRECT_TYPES, llama_quantize, write_gguf

            if opts.gguf_type in DIRECT_TYPES:
                info = write_gguf(Path(opts.model), tmp, opts.gguf_type)
            else:  # llama.cpp's quantizer, from an F16 file
                f16 = _tmp_beside(out, ".f16.gguf")
                tmps.append(f16)
                info = write_gguf(Path(opts.model), f16, "F16")
                log(f"running llama.cpp's quantizer to {opts.gguf_type}")
                llama_quantize(f16, tmp, opts.gguf_type, opts.threads)
                info = {"tensor_types": None, "fallbacks": info["fallbacks"], "direct_from_codes": 0,
                        "quantized_by": "llama.cpp"}
            from itera.runtime.llamacpp_backend import LlamaCppRuntime

            rt = LlamaCppRuntime(tmp, threads=opts.threads)
            got_ids = rt.tokenizer.encode(VERIFY_TEXT, add_bos=False)
            info["tokenizer_parity"] = got_ids == tok.encode(VERIFY_TEXT, add_bos=False)
            got = rt.logits(ids)
            rt.close()
        elif opts.format == "onnx":
            from itera.export.onnx import kv_path, write_onnx
            from itera.runtime.generate import OnnxStepper, greedy
            from itera.runtime.onnx_backend import OnnxRuntime

            kv_tmp = _tmp_beside(out, ".kv.onnx")
            tmps.append(kv_tmp)
            write_onnx(model, cfg, Path(opts.model), tmp, kv_tmp, opts.onnx_quant)
            got = OnnxRuntime(tmp, threads=opts.threads).logits(ids)
            prompt, n_new = ids[:8], 16
            kv_tokens = greedy(OnnxStepper(kv_tmp, opts.threads), prompt, n_new)
            seq, ref_tokens = list(prompt), []
            with torch.no_grad():
                for _ in range(n_new):
                    ref_tokens.append(int(model(torch.tensor([seq]))[0, -1].argmax()))
                    seq.append(ref_tokens[-1])
            info["kv_greedy_agreement"] = sum(a == b for a, b in zip(kv_tokens, ref_tokens)) / n_new
            extra_outputs.append(kv_path(out))
        else:
            x = torch.tensor([ids])
            from itera.export.onnx import _Logits

            wrapped = _Logits(model).eval()
            with torch.no_grad():
                if opts.format == "pt2":
                    seq_dim = torch.export.Dim("seq", min=2, max=cfg.max_position_embeddings)
                    ep = torch.export.export(wrapped, (x,), dynamic_shapes={"input_ids": {1: seq_dim}})
                    torch.export.save(ep, str(tmp))
                    got = torch.export.load(str(tmp)).module()(x)[0].numpy()
                else:
                    import warnings

                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore")
                        torch.jit.trace(wrapped, x).save(str(tmp))
                    got = torch.jit.load(str(tmp))(x)[0].numpy()
        figures = {**compare(ref, got), "verify_tokens": len(ids)}
        tol = opts.tolerance()
        ok = all(figures["max_abs_logit_diff"] <= v if k == "max_abs_logit_diff" else figures["top1_agreement"] >= v
                 for k, v in tol.items())
        if opts.format == "onnx" and info["kv_greedy_agreement"] < 1.0 and not opts.onnx_quant:
            ok = False
        if opts.format == "gguf" and not info["tokenizer_parity"]:
            ok = False
        if not ok and not opts.allow_mismatch:
            raise VerificationError(
                f"the {opts.format} export disagrees with the source model beyond tolerance {tol}: "
                f"max |logit diff| {figures['max_abs_logit_diff']:.3g}, top-1 agreement {figures['top1_agreement']:.3f}"
                + (f", kv greedy agreement {info.get('kv_greedy_agreement')}" if opts.format == "onnx" else "")
                + (", tokenizer mismatch" if info.get("tokenizer_parity") is False else "")
                + "; the artifact was removed (pass --allow-mismatch to keep it)")
        os.replace(tmp, out)
        if opts.format == "onnx":
            os.replace(kv_tmp, kv_path(out))
    finally:
        for t in tmps:
            t.unlink(missing_ok=True)
    return {"metrics": {**figures, **info, "verified": ok, "tolerance": tol},
            "params": opts.as_params(), "extra_outputs": [str(p) for p in extra_outputs]}
