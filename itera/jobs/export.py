"""``itera export``: write an artifact for a runtime, then prove the runtime runs it right.

Phases: :func:`load_source` (config checked against the weights, the format's own checks, the
float source's logits on real text), the format's ``write`` into a staging path, its ``verify``
in the target runtime (llama.cpp, onnxruntime, torch.export, TorchScript), :func:`judge` (see
:mod:`itera.export.verify`: runtime against the file's own weights, tokenization, quality loss
against the source), and the rename into place. A failed check removes everything, unless
``allow_mismatch``.

A new format is a module with ``check(cfg, opts)``, ``write(src, opts, staging, reporter) -> info``
and ``verify(src, opts, path, info) -> (runtime logits, file logits or None, figures, problems)``,
and a row in :data:`itera.export.formats.FORMATS` (and one in :data:`itera.artifacts.KINDS`).
"""

from __future__ import annotations

import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from itera.artifacts import describe_artifact
from itera.errors import InputError, IteraError, UsageError
from itera.export import VERIFY_TOKENS
from itera.export.formats import FORMATS, ExportFormat
from itera.fsio import set_file_mode, temp_dir_beside, temp_path_beside
from itera.options import flag
from itera.progress import SILENT, Reporter
from itera.record import Outcome


class VerificationError(IteraError):
    """The runtime disagreed with the source model beyond the tolerance."""

    exit_code = 1


@dataclass
class ExportOptions:
    model: Path = flag("--model")  # the CLI's default: the artifact of the record on stdin
    out: Path = flag("--out")
    format: str = flag("--format")
    gguf_type: str = flag("--gguf-type", default="AUTO")  # the checkpoint's own types (F16 for a float checkpoint)
    calib: str | None = flag("--calib", default=None)  # importance data for llama.cpp's quantizer, from this text
    calib_samples: int = flag("--calib-samples", default=32)
    calib_seqlen: int = flag("--calib-seqlen", default=256)
    text_field: str = flag("--text-field", default="text")
    onnx_quant: str | None = flag("--onnx-quant", default=None)
    allow_mismatch: bool = flag("--allow-mismatch", default=False)
    verify_tokens: int = flag("--verify-tokens", default=VERIFY_TOKENS)
    threads: int | None = flag("--threads", default=None)
    # the user's bound on max |logit diff| against the float source
    max_logit_diff: float | None = flag("--max-logit-diff", default=None)
    # the user's bound on KL(source || export) per token (default: by type)
    max_kl: float | None = flag("--max-kl", default=None)
    min_top1: float | None = flag("--min-top1", default=None)  # the user's bound on top-1 agreement with the source
    force: bool = flag("--force", default=False)

    def validate(self) -> "ExportOptions":
        from itera.export.gguf import GGUF_TYPES
        from itera.export.onnx import ONNX_QUANT

        if self.format not in FORMATS:
            *others, last = FORMATS
            raise UsageError(f"unknown --format {self.format!r}; use {', '.join(others)} or {last}")
        self.gguf_type = self.gguf_type.upper()  # llama.cpp's tools take q4_k_m as well as Q4_K_M
        if self.format == "gguf" and self.gguf_type not in GGUF_TYPES:
            raise UsageError(f"unknown --gguf-type {self.gguf_type!r}; use one of {', '.join(GGUF_TYPES)}")
        if self.calib is not None and self.format != "gguf":
            raise UsageError("--calib (importance data for llama.cpp's quantizer) goes with --format gguf")
        if self.calib_samples < 1 or self.calib_seqlen < 2:
            raise UsageError("--calib-samples must be >= 1 and --calib-seqlen >= 2")
        if self.onnx_quant is not None and (self.format != "onnx" or self.onnx_quant not in ONNX_QUANT):
            raise UsageError("--onnx-quant takes int8 or int4 and goes with --format onnx")
        if self.out.is_dir():
            raise UsageError(f"--out {self.out} is a directory; pass a file name like model{FORMATS[self.format].suffix}")
        if self.verify_tokens < 2:
            raise UsageError("--verify-tokens must be at least 2")
        for name in ("max_logit_diff", "max_kl", "min_top1"):
            v = getattr(self, name)
            if v is not None and not (v >= 0 and v == v and v != float("inf")):
                raise UsageError(f"--{name.replace('_', '-')} must be a non-negative number (got {v})")
        if self.min_top1 is not None and self.min_top1 > 1:
            raise UsageError(f"--min-top1 must be at most 1 (got {self.min_top1})")
        return self

    @property
    def kind(self) -> str:
        """The artifact's type for tolerances: the GGUF type, the ONNX quantization, or the format."""
        return self.gguf_type if self.format == "gguf" else (self.onnx_quant or self.format)

    def inputs(self) -> list[Path]:
        from itera.data import local_path

        return [p for p in (self.model, local_path(self.calib) if self.calib else None) if p is not None]

    def outputs(self) -> list:
        from itera.fsio import Output
        from itera.artifacts import kv_path

        outs = [Output(self.out, "file", "--out", self.force)]
        if self.format == "onnx":
            kv = kv_path(self.out)
            outs += [Output(kv, "file", "--out (its .kv.onnx graph)", self.force),
                     Output(self.out.with_name(self.out.name + ".data"), "file", "--out (its .data file)", self.force),
                     Output(kv.with_name(kv.name + ".data"), "file", "--out (its .kv.onnx.data file)", self.force)]
        return outs

    def tolerance(self) -> dict:
        """What the export is held to: the runtime against the file's weights (relative RMS of the
        logits), and the quality loss against the source (the user's bounds, or the type's)."""
        from itera.export.verify import BLOCK_TOLERANCE, DEFAULT_MAX_KL, MAX_KL, RUNTIME_TOLERANCE

        tol = {"runtime_vs_file_rel_rms": RUNTIME_TOLERANCE.get(self.kind, BLOCK_TOLERANCE),
               "max_kl": self.max_kl if self.max_kl is not None else MAX_KL.get(self.kind, DEFAULT_MAX_KL)}
        if self.max_logit_diff is not None:
            tol["max_abs_logit_diff"] = self.max_logit_diff
        if self.min_top1 is not None:
            tol["min_top1_agreement"] = self.min_top1
        return tol

    def as_params(self) -> dict:
        d = asdict(self)
        d["model"], d["out"] = str(self.model), str(self.out)
        return d


# --------------------------------------------------------------------------- phases


@dataclass
class Source:
    """The checkpoint being exported and what verification compares against."""

    path: Path
    cfg: object
    tokenizer: object
    model: object  # the float torch model (dequantized for itera-quant checkpoints); None once not needed
    ids: list[int]  # real text's token ids every runtime is run on
    ref: np.ndarray  # the float source's logits on ``ids``
    importance: dict | None = None  # GGUF tensor name -> importance data, with --calib
    importance_figures: dict | None = None


def load_source(opts: ExportOptions, fmt: ExportFormat) -> Source:
    """Check everything cheap, then the source's logits on real text. GGUF is written from the
    checkpoint's files, not the model, so for it the model is let go at once (peak memory)."""
    import torch

    from itera.export.verify import quality_ids
    from itera.model.checkpoint import load_checked_config, load_model
    from itera.tokenizer import Tokenizer

    cfg = load_checked_config(opts.model)[0]
    if opts.format == "gguf" and opts.gguf_type == "AUTO" and not cfg.quantization:
        opts.gguf_type = "F16"  # a float checkpoint's own type
    if not (Path(opts.model) / "tokenizer.json").is_file():
        raise InputError(f"{opts.model} has no tokenizer.json; an export carries the tokenizer, so add the "
                         "model's tokenizer.json to the checkpoint")
    fmt.check(cfg, opts)
    tok = Tokenizer.from_dir(opts.model)
    tok.check_fits(cfg.vocab_size, str(opts.model))
    ids = quality_ids(tok, min(opts.verify_tokens, cfg.max_position_embeddings))
    model, _ = load_model(opts.model)
    with torch.no_grad():
        ref = model(torch.tensor([ids]))[0].numpy()
    src = Source(Path(opts.model), cfg, tok, None if opts.format == "gguf" else model, ids, ref)
    if opts.calib:
        src.importance, src.importance_figures = importance_data(opts, cfg, tok, model)
    return src


def importance_data(opts: ExportOptions, cfg, tok, model) -> tuple[dict, dict]:
    """Importance data for llama.cpp's quantizer from the head of --calib (its tail is held out,
    as in ``itera quantize``), by GGUF tensor name."""
    import torch

    from itera.data import load_text, split_heldout
    from itera.quant.importance import gguf_importance, input_mean_squares
    from itera.train import calibration_ids

    head, _ = split_heldout(load_text(opts.calib, purpose="train", field=opts.text_field).text, 0.1)
    tokens = torch.tensor(tok.encode(head, add_bos=False), dtype=torch.long)
    calib = calibration_ids(tokens, opts.calib_samples, min(opts.calib_seqlen, cfg.max_position_embeddings), 0)
    data = gguf_importance(input_mean_squares(model, calib), cfg)
    return data, {"source": opts.calib, "tokens": int(calib.numel()), "tensors": len(data)}


class Staging:
    """Temporary files beside the output (``.NAME.tmp-*``): ``main`` for the artifact, more with
    :meth:`temp`, whole private directories with :meth:`private` (files in them are given their
    final names with :meth:`stage`). :meth:`commit` renames every staged file into place, the
    artifact last; whatever is left when the block ends is removed."""

    def __init__(self, out: Path, suffix: str):
        self.out = Path(out)
        self.files: list[tuple[Path, Path | None]] = []
        self.dirs: list[Path] = []
        # missing directories of --out are made here, as quantize's and report's outputs are (the
        # output contract checked beforehand that they can be); removed again if nothing is committed
        self.made = [p for p in reversed(self.out.absolute().parents) if not os.path.lexists(p)]
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.committed = False
        self.main = self.temp(suffix, final=self.out)

    def temp(self, suffix: str, final: Path | None = None) -> Path:
        tmp = temp_path_beside(self.out, suffix)
        self.files.append((tmp, final))
        return tmp

    def private(self) -> Path:
        d = temp_dir_beside(self.out)
        self.dirs.append(d)
        return d

    def stage(self, tmp: Path, final: Path, main: bool = False) -> None:
        """``tmp`` (in a private directory) becomes ``final`` at commit; with ``main`` it is the artifact."""
        if main:
            self.main = tmp
        else:
            self.files.append((tmp, final))

    def commit(self) -> list[Path]:
        """Rename every file with a final name (the artifact last); returns the extra outputs."""
        extras = [(t, f) for t, f in self.files if f is not None and f != self.out]
        for tmp, final in [*extras, (self.main, self.out)]:
            set_file_mode(tmp)
            os.replace(tmp, final)
        self.committed = True
        return [f for _, f in extras]

    def __enter__(self) -> "Staging":
        return self

    def __exit__(self, *exc) -> None:
        for tmp, _ in self.files:
            tmp.unlink(missing_ok=True)
        for d in self.dirs:
            shutil.rmtree(d, ignore_errors=True)
        if not self.committed:
            for d in reversed(self.made):
                try:
                    d.rmdir()
                except OSError:
                    break


def judge(opts: ExportOptions, src: Source, runtime: np.ndarray, file_logits: np.ndarray | None,
          problems: list[str]) -> tuple[dict, list[str]]:
    """Figures of the three questions and every problem found (none: verified)."""
    from itera.export.verify import quality
    from itera.runtime.base import compare

    tol = opts.tolerance()
    problems = list(problems)
    vs_source = compare(src.ref, runtime)
    q = quality(src.ref, runtime, src.ids)
    figures = {"max_abs_logit_diff": vs_source["max_abs_logit_diff"],
               "mean_abs_logit_diff": vs_source["mean_abs_logit_diff"], "top1_agreement": q["top1_agreement"],
               "kl_to_source": q["kl_to_source"], "perplexity_source": q["perplexity_source"],
               "perplexity_export": q["perplexity_export"], "verify_tokens": len(src.ids),
               "runtime_vs_file": None}
    if file_logits is not None:
        rv = compare(file_logits, runtime)
        figures["runtime_vs_file"] = rv
        if rv["rel_rms"] > tol["runtime_vs_file_rel_rms"]:
            problems.append(f"the runtime disagrees with the file's own weights (relative RMS logit difference "
                            f"{rv['rel_rms']:.3g} > {tol['runtime_vs_file_rel_rms']:.3g}): the file is not what "
                            "the runtime computes with")
    lost = []
    if q["kl_to_source"] > tol["max_kl"]:
        lost.append(f"KL {q['kl_to_source']:.4g} > {tol['max_kl']:.4g}")
    if "max_abs_logit_diff" in tol and vs_source["max_abs_logit_diff"] > tol["max_abs_logit_diff"]:
        lost.append(f"max |logit diff| {vs_source['max_abs_logit_diff']:.3g} > {tol['max_abs_logit_diff']:.3g}")
    if "min_top1_agreement" in tol and q["top1_agreement"] < tol["min_top1_agreement"]:
        lost.append(f"top-1 agreement {q['top1_agreement']:.3f} < {tol['min_top1_agreement']:.3f}")
    if lost:
        problems.append("it disagrees with the source model beyond tolerance (" + ", ".join(lost) + ")")
    return figures, problems


# --------------------------------------------------------------------------- the job


def run_export(opts: ExportOptions, reporter: Reporter = SILENT) -> Outcome:
    opts.validate()
    fmt = FORMATS[opts.format]
    src = load_source(opts, fmt)
    with Staging(opts.out, fmt.suffix) as staging:
        info = fmt.write(src, opts, staging, reporter)
        runtime, file_logits, checks, problems = fmt.verify(src, opts, staging.main, info)
        figures, problems = judge(opts, src, runtime, file_logits, problems)
        if problems and not opts.allow_mismatch:
            raise VerificationError(f"the {opts.format} export failed verification: " + "; ".join(problems)
                                    + "; the artifact was removed (pass --allow-mismatch to keep it)")
        extras = staging.commit()
    metrics = {**figures, **info, **checks, "verified": not problems, "problems": problems,
               "tolerance": opts.tolerance()}
    params = {**opts.as_params(), "extra_outputs": [str(p) for p in extras]}
    return Outcome(describe_artifact(opts.out, "file", opts.format, companions=extras), metrics, params)
