from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from itera.commands._options import Device, Force, MetricsOut, ModelPath, TextField, execute, model_input


def quantize(
    out: Annotated[Path, typer.Option("--out", "-o", help="Directory for the quantized checkpoint.")],
    model: ModelPath = None,
    method: Annotated[str, typer.Option(help="rtn | gptq | auto (mixed precision from measured sensitivity).")] = "gptq",
    bits: Annotated[int, typer.Option(help="8, 4, 3 or 2 (rtn, gptq).")] = 4,
    group_size: Annotated[Optional[int], typer.Option(help="Input columns per scale, e.g. 32, 64, 128. "
                                                      "Default: one scale per output channel.")] = None,
    sym: Annotated[bool, typer.Option("--sym/--asym", help="Symmetric codes (GGUF Q4_0/Q8_0 compatible at "
                                      "group size 32) or asymmetric with zero points.")] = True,
    calib: Annotated[Optional[str], typer.Option(help="Calibration text (file or dataset); its tail is held "
                                                 "out for the before/after perplexity.")] = None,
    calib_samples: Annotated[int, typer.Option(help="Calibration sequences.")] = 32,
    calib_seqlen: Annotated[int, typer.Option(help="Tokens per calibration sequence.")] = 256,
    damp: Annotated[float, typer.Option(help="GPTQ Hessian dampening, a fraction of its mean diagonal.")] = 0.01,
    act_order: Annotated[bool, typer.Option("--act-order", help="GPTQ: quantize columns by decreasing "
                                            "Hessian diagonal (static groups).")] = False,
    target_bpw: Annotated[Optional[float], typer.Option(help="auto: budget in bits per weight over the "
                                                        "quantized layers, e.g. 4.5.")] = None,
    auto_bits: Annotated[str, typer.Option(help="auto: candidate bit widths.")] = "2,3,4,8",
    auto_base: Annotated[str, typer.Option(help="auto: apply the chosen plan with rtn or gptq.")] = "gptq",
    plan: Annotated[Optional[Path], typer.Option(help="auto: reuse a quant_plan.json instead of measuring.")] = None,
    quantize_embeddings: Annotated[bool, typer.Option("--quantize-embeddings", help="Also quantize the "
                                                      "embeddings and output head (16-bit by default).")] = False,
    eval_tokens: Annotated[int, typer.Option(help="Held-out tokens for perplexity before/after.")] = 4096,
    seed: Annotated[int, typer.Option()] = 0,
    device: Device = "auto",
    text_field: TextField = "text",
    force: Force = False,
    metrics_out: MetricsOut = None,
) -> None:
    """Quantize a checkpoint's weights to 8/4/3/2 bits with round-to-nearest, GPTQ, or a mixed-precision plan.

    The output keeps the checkpoint layout (packed codes, float16 scales, quantization_config in
    config.json) and loads back in itera; `itera evaluate` runs on it.

    Examples:

      itera quantize --model runs/teacher --method gptq --bits 4 --group-size 32 --calib pydocs@test --out runs/q4

      itera quantize --model runs/teacher --method auto --target-bpw 4.5 --calib notes.txt --out runs/mixed
    """
    from itera.quant.job import QuantizeOptions, run_quantize

    path, parent = model_input(model)
    opts = QuantizeOptions(model=path, out=out, method=method, bits=bits, group_size=group_size, sym=sym,
                           calib=calib, calib_samples=calib_samples, calib_seqlen=calib_seqlen, damp=damp,
                           act_order=act_order, target_bpw=target_bpw, auto_bits=auto_bits, auto_base=auto_base,
                           plan=plan, quantize_embeddings=quantize_embeddings, eval_tokens=eval_tokens, seed=seed,
                           device=device, text_field=text_field, force=force)
    execute("quantize", run_quantize, opts.validate(), parent, metrics_out, summary=_summary)


def _summary(console, m: dict) -> None:
    line = f"{m['bits_per_weight']:.3f} bits per weight, {m['size_ratio']:.2f}x smaller"
    if m["perplexity_after"]:
        line += (f", held-out perplexity {m['perplexity_before']:.3f} -> {m['perplexity_after']:.3f} "
                 f"({m['eval_tokens']} tokens of the --calib text's tail)")
    console.log(line)
