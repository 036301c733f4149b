from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from itera.commands._options import MetricsOut, ModelPath, Threads, model_input


def export(
    out: Annotated[Path, typer.Option("--out", "-o", help="Output file (its directory must exist).")],
    fmt: Annotated[str, typer.Option("--format", "-f", help="gguf (llama.cpp), onnx (onnxruntime), pt2 "
                                     "(torch.export) or torchscript (deprecated by PyTorch; for existing deployments).")],
    model: ModelPath = None,
    gguf_type: Annotated[str, typer.Option(help="GGUF tensor type: F32, F16, BF16, Q8_0, Q4_0 (written by "
                                           "itera), or a llama.cpp quantization such as Q4_K_M, Q5_K_M, Q6_K.")] = "F16",
    onnx_quant: Annotated[Optional[str], typer.Option(help="ONNX weight quantization: int8 (dynamic) or "
                                                      "int4 (MatMulNBits).")] = None,
    allow_mismatch: Annotated[bool, typer.Option("--allow-mismatch", help="Keep the artifact even when its "
                                                 "runtime disagrees with the source beyond tolerance.")] = False,
    verify_tokens: Annotated[int, typer.Option(help="Tokens run through both models to verify.")] = 128,
    max_logit_diff: Annotated[Optional[float], typer.Option(help="Tolerance on max |logit diff|, replacing "
                                                            "the type's default (see the README).")] = None,
    threads: Threads = None,
    metrics_out: MetricsOut = None,
) -> None:
    """Export a checkpoint (float or itera-quantized) for a runtime and verify it there.

    After writing, the artifact is loaded in its runtime and compared with the source model on the
    same token ids (max/mean |logit diff|, top-1 agreement). Beyond the tolerance of its type the
    export fails with exit code 1 and the file is removed, unless --allow-mismatch.
    """
    from itera import record
    from itera.export.job import ExportOptions, run_export
    from itera.model.checkpoint import check_checkpoint_dir

    opts = ExportOptions(model=Path("."), out=out, format=fmt, gguf_type=gguf_type, onnx_quant=onnx_quant,
                         allow_mismatch=allow_mismatch, verify_tokens=verify_tokens, threads=threads,
                         max_logit_diff=max_logit_diff).validate()
    opts.model, parent = model_input(model)
    check_checkpoint_dir(opts.model)
    run = record.Run("export", parent=parent)
    result = run_export(opts, log=lambda m: print(m, file=sys.stderr))
    m = result["metrics"]
    print(f"{out}: max |logit diff| {m['max_abs_logit_diff']:.3g}, top-1 agreement {m['top1_agreement']:.3f} "
          f"({'verified' if m['verified'] else 'NOT within tolerance, kept by --allow-mismatch'})", file=sys.stderr)
    for fb in m.get("fallbacks") or []:
        print(f"  fallback: {fb['tensor']} {fb['wanted']} -> {fb['written']} ({fb['reason']})", file=sys.stderr)
    fmt_name = {"torchscript": "torchscript", "pt2": "pt2"}.get(fmt, fmt)
    params = {**result["params"], "extra_outputs": result["extra_outputs"]}
    rec = run.record(record.describe_artifact(out, "file", fmt_name), m, params)
    record.emit(rec, metrics_out=metrics_out)
