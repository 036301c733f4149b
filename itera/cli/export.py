from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from itera.cli._options import Force, MetricsOut, ModelPath, TextField, Threads, execute, model_input
from itera.export import VERIFY_TOKENS


def export(
    out: Annotated[Path, typer.Option("--out", "-o", help="Output file (missing directories are created).")],
    fmt: Annotated[str, typer.Option("--format", "-f", help="gguf (llama.cpp), onnx (onnxruntime), pt2 "
                                     "(torch.export) or torchscript (deprecated by PyTorch; for existing "
                                     "deployments); any case.")],
    model: ModelPath = None,
    gguf_type: Annotated[str, typer.Option(help="GGUF tensor type: AUTO (the checkpoint's own: the types "
                                           "`itera quantize` stored, F16 for a float checkpoint), F32, F16, BF16, "
                                           "Q8_0, Q4_0 (written by itera), or a llama.cpp quantization such as "
                                           "Q4_K_M, Q5_K_M, Q6_K.")] = "AUTO",
    calib: Annotated[Optional[str], typer.Option("--calib", "--data", "--dataset", "-d", metavar="TEXT",
                                                 help="Calibration text (file or dataset) for llama.cpp's "
                                                 "quantizer: importance data (mean square of every input), as "
                                                 "llama-imatrix collects it.")] = None,
    calib_samples: Annotated[int, typer.Option(help="Calibration sequences for --calib.")] = 32,
    calib_seqlen: Annotated[int, typer.Option(help="Tokens per calibration sequence.")] = 256,
    text_field: TextField = "text",
    onnx_quant: Annotated[Optional[str], typer.Option(help="ONNX weight quantization: int8 (dynamic) or "
                                                      "int4 (MatMulNBits).")] = None,
    allow_mismatch: Annotated[bool, typer.Option("--allow-mismatch", help="Keep the artifact even when its "
                                                 "runtime disagrees with the source beyond tolerance.")] = False,
    verify_tokens: Annotated[int, typer.Option(help="Tokens of text run through both the source and the export "
                                               "to compare their logits: a parity check, not the perplexity "
                                               "that --eval-tokens bounds elsewhere.")] = VERIFY_TOKENS,
    max_logit_diff: Annotated[Optional[float], typer.Option(help="Tolerance on max |logit diff|, replacing "
                                                            "the type's default (see docs/commands.md).")] = None,
    max_kl: Annotated[Optional[float], typer.Option(help="Bound on the mean KL(source || export) per token, in "
                                                    "nats, replacing the type's default (see docs/commands.md).")] = None,
    min_top1: Annotated[Optional[float], typer.Option(help="Least top-1 agreement with the source (0 to 1): the "
                                                      "share of positions where both pick the same next token. "
                                                      "Default: not checked.")] = None,
    threads: Threads = None,
    force: Force = False,
    metrics_out: MetricsOut = None,
) -> None:
    """Export a checkpoint (float or itera-quantized) for a runtime and verify it there.

    After writing, the artifact is loaded in its runtime and compared with the source model on the
    same token ids (max/mean |logit diff|, top-1 agreement). Beyond the tolerance of its type the
    export fails with exit code 1 and the file is removed, unless --allow-mismatch.

    Examples:

      # the types `itera quantize` chose
      itera export --model runs/q4 --format gguf --out runs/q4.gguf

      # llama.cpp's Q4_K_M, with importance data from pydocs@train
      itera export --model runs/teacher --format gguf --gguf-type Q4_K_M \\
        --calib pydocs@train --out m.gguf

      # also writes m.kv.onnx
      itera export --model runs/teacher --format onnx --out m.onnx
    """
    from itera.jobs.export import ExportOptions, run_export

    path, parent = model_input(model)
    opts = ExportOptions(model=path, out=out, format=fmt.lower(), gguf_type=gguf_type, calib=calib,
                         calib_samples=calib_samples, calib_seqlen=calib_seqlen, onnx_quant=onnx_quant,
                         allow_mismatch=allow_mismatch, verify_tokens=verify_tokens, threads=threads,
                         max_logit_diff=max_logit_diff, max_kl=max_kl, min_top1=min_top1, text_field=text_field,
                         force=force)
    execute("export", run_export, opts.validate(), parent, metrics_out, summary=lambda c, m: _summary(c, out, m))


def _summary(console, out: Path, m: dict) -> None:
    state = "verified" if m["verified"] else "NOT within tolerance, kept by --allow-mismatch"
    console.log(f"{out}: max |logit diff| {m['max_abs_logit_diff']:.3g}, top-1 agreement {m['top1_agreement']:.3f} "
                f"({state})")
    if m.get("fallbacks"):  # one line however many tensors fell back; the record lists every one
        from itera.export.gguf import fallback_summary

        console.log("  " + fallback_summary(m["fallbacks"]))
