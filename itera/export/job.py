"""``itera export``: write an artifact for a runtime, then prove the runtime agrees with the source.

Phases: :func:`load_source` (config checked against the weights, the format's own checks, the
source model's reference logits on fixed token ids), the format's ``write`` into a staging
path, its ``verify`` in the target runtime (llama.cpp, onnxruntime, torch.export, TorchScript),
:func:`gate` on the figures, and the rename into place. Beyond the tolerance of the artifact's
type the export fails and nothing is left behind, unless ``allow_mismatch``.

A new format is a module with ``check(cfg, opts)``, ``write(src, opts, staging, reporter) -> info``
and ``verify(src, opts, path, info) -> (logits, figures, problems)``, and a row in :data:`FORMATS`.
"""

from __future__ import annotations

import importlib
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from itera.errors import InputError, IteraError, UsageError
from itera.fsio import set_file_mode, temp_path_beside
from itera.progress import SILENT, Reporter
from itera.record import Outcome, describe_artifact


@dataclass(frozen=True)
class Format:
    suffix: str
    module: str  # under itera.export
    write: str = "write"
    verify: str = "verify"

    def entry(self, name: str):
        return getattr(importlib.import_module(f"itera.export.{self.module}"), name)


FORMATS = {
    "gguf": Format(".gguf", "gguf"),
    "onnx": Format(".onnx", "onnx"),
    "pt2": Format(".pt2", "torchfmt", "write_pt2", "verify_pt2"),
    "torchscript": Format(".pt", "torchfmt", "write_torchscript", "verify_torchscript"),
}
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
    force: bool = False

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
            raise UsageError(f"--out {self.out} is a directory; pass a file name like model{FORMATS[self.format].suffix}")
        if self.verify_tokens < 2:
            raise UsageError("--verify-tokens must be at least 2")
        return self

    def inputs(self) -> list[Path]:
        return [self.model]

    def outputs(self) -> list:
        from itera.fsio import Output
        from itera.runtime.onnx_backend import kv_path

        outs = [Output(self.out, "file", "--out", self.force)]
        if self.format == "onnx":
            outs.append(Output(kv_path(self.out), "file", "--out (its .kv.onnx graph)", self.force))
        return outs

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


# --------------------------------------------------------------------------- phases


@dataclass
class Source:
    """The checkpoint being exported and what verification compares against."""

    path: Path
    cfg: object
    tokenizer: object
    model: object  # the torch model, float (dequantized for itera-quant checkpoints)
    ids: list[int]  # the token ids every runtime is run on
    ref: np.ndarray  # the source model's logits on ``ids``
    verify_text: str = VERIFY_TEXT


def load_source(opts: ExportOptions, fmt: Format) -> Source:
    import torch

    from itera.model.checkpoint import load_checked_config, load_model
    from itera.tokenizer import Tokenizer

    cfg = load_checked_config(opts.model)[0]
    if not (Path(opts.model) / "tokenizer.json").is_file():
        raise InputError(f"{opts.model} has no tokenizer.json; an export carries the tokenizer, so add the "
                         "model's tokenizer.json to the checkpoint")
    fmt.entry("check")(cfg, opts)
    tok = Tokenizer.from_dir(opts.model)
    tok.check_fits(cfg.vocab_size, str(opts.model))
    ids = tok.encode(VERIFY_TEXT * 4, add_bos=False)[: min(opts.verify_tokens, cfg.max_position_embeddings)]
    model, _ = load_model(opts.model)
    with torch.no_grad():
        ref = model(torch.tensor([ids]))[0].numpy()
    return Source(Path(opts.model), cfg, tok, model, ids, ref)


class Staging:
    """Temporary files beside the output (``.NAME.tmp-*``): ``main`` for the artifact, more with
    :meth:`temp`. :meth:`commit` renames those that have a final name into place; every
    temporary file still there when the block ends is removed."""

    def __init__(self, out: Path, suffix: str):
        self.out = Path(out)
        self.files: list[tuple[Path, Path | None]] = []
        self.main = self.temp(suffix, final=self.out)

    def temp(self, suffix: str, final: Path | None = None) -> Path:
        tmp = temp_path_beside(self.out, suffix)
        self.files.append((tmp, final))
        return tmp

    def commit(self) -> list[Path]:
        """Rename every file with a final name (the artifact last); returns the extra outputs."""
        extras = [(t, f) for t, f in self.files if f is not None and f != self.out]
        for tmp, final in [*extras, (self.main, self.out)]:
            set_file_mode(tmp)
            os.replace(tmp, final)
        return [f for _, f in extras]

    def __enter__(self) -> "Staging":
        return self

    def __exit__(self, *exc) -> None:
        for tmp, _ in self.files:
            tmp.unlink(missing_ok=True)


def gate(opts: ExportOptions, figures: dict, problems: list[str]) -> bool:
    """Whether the artifact is within its type's tolerance and passed the format's own checks."""
    ok = all(figures["max_abs_logit_diff"] <= v if k == "max_abs_logit_diff" else figures["top1_agreement"] >= v
             for k, v in opts.tolerance().items())
    return ok and not problems


# --------------------------------------------------------------------------- the job


def run_export(opts: ExportOptions, reporter: Reporter = SILENT) -> Outcome:
    opts.validate()
    fmt = FORMATS[opts.format]
    src = load_source(opts, fmt)
    with Staging(opts.out, fmt.suffix) as staging:
        info = fmt.entry(fmt.write)(src, opts, staging, reporter)
        got, checks, problems = fmt.entry(fmt.verify)(src, opts, staging.main, info)
        figures = {**compare(src.ref, got), "verify_tokens": len(src.ids)}
        ok = gate(opts, figures, problems)
        if not ok and not opts.allow_mismatch:
            raise VerificationError(
                f"the {opts.format} export disagrees with the source model beyond tolerance {opts.tolerance()}: "
                f"max |logit diff| {figures['max_abs_logit_diff']:.3g}, top-1 agreement "
                f"{figures['top1_agreement']:.3f}" + "".join(f", {p}" for p in problems)
                + "; the artifact was removed (pass --allow-mismatch to keep it)")
        extras = staging.commit()
    metrics = {**figures, **info, **checks, "verified": ok, "tolerance": opts.tolerance()}
    params = {**opts.as_params(), "extra_outputs": [str(p) for p in extras]}
    return Outcome(describe_artifact(opts.out, "file", opts.format), metrics, params)
