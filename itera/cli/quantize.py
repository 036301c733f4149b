from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from itera.cli._options import Device, Force, MetricsOut, ModelPath, TextField, TorchThreads, execute, model_input


def quantize(
    out: Annotated[Path, typer.Option("--out", "-o", help="Directory for the quantized checkpoint.")],
    model: ModelPath = None,
    method: Annotated[str, typer.Option(help="rtn | gptq | auto (a GGUF type per tensor from its "
                                        "sensitivity, under a budget in GGUF file bytes).")] = "gptq",
    bits: Annotated[int, typer.Option(help="8, 4, 3 or 2 (rtn, gptq).")] = 4,
    gguf_type: Annotated[Optional[str], typer.Option(help="rtn, gptq: store every layer as this GGUF block "
                                                     "type instead (Q2_K, Q3_K, IQ4_XS, Q4_0, IQ4_NL, Q4_K, Q4_1, "
                                                     "Q5_0, Q5_K, Q5_1, Q6_K, Q8_0).")] = None,
    group_size: Annotated[Optional[int], typer.Option(help="Input columns per scale, e.g. 32, 64, 128. "
                                                      "Default: one scale per output channel.")] = None,
    sym: Annotated[bool, typer.Option("--sym/--asym", help="Symmetric codes (GGUF Q4_0/Q8_0 compatible at "
                                      "group size 32) or asymmetric with zero points.")] = True,
    calib: Annotated[Optional[str], typer.Option("--calib", "--data", "--dataset", "-d", metavar="TEXT",
                                                 help="Calibration text (file or dataset); its tail is held "
                                                 "out for the before/after perplexity.")] = None,
    calib_samples: Annotated[int, typer.Option(help="Calibration sequences: GPTQ's Hessians use every "
                                               "one, importance data the first 32.")] = 128,
    calib_seqlen: Annotated[int, typer.Option(help="Tokens per calibration sequence.")] = 256,
    damp: Annotated[float, typer.Option(help="GPTQ Hessian dampening, a fraction of its mean diagonal.")] = 0.01,
    act_order: Annotated[bool, typer.Option("--act-order", help="GPTQ: quantize columns by decreasing "
                                            "Hessian diagonal (static groups).")] = False,
    target_bpw: Annotated[Optional[float], typer.Option(help="auto: budget in bits per weight over every "
                                                        "tensor of the GGUF file, e.g. 4.5.")] = None,
    target_bytes: Annotated[Optional[int], typer.Option(help="auto: budget in bytes of the GGUF file.")] = None,
    auto_types: Annotated[str, typer.Option(help="auto: candidate GGUF types, comma-separated, or all "
                                            "(F16 is always one).")] = "all",
    auto_base: Annotated[str, typer.Option(metavar="METHOD", help="auto: apply the chosen plan with rtn or gptq.")] = "gptq",
    planner: Annotated[str, typer.Option(help="auto: predicted (each type's KL from one calibration pass; "
                                         "about 7 minutes at 1B parameters on 2 cores) or measured (a "
                                         "forward pass per tensor and type).")] = "predicted",
    plan: Annotated[Optional[Path], typer.Option(help="auto: reuse a quant_plan.json instead of measuring.")] = None,
    quantize_embeddings: Annotated[bool, typer.Option("--quantize-embeddings", help="Also quantize the "
                                                      "embeddings and output head (16-bit by default).")] = False,
    eval_tokens: Annotated[int, typer.Option(help="Held-out tokens scored for perplexity before and after (at "
                                             "most; what `evaluate --eval-tokens` means too).")] = 4096,
    seed: Annotated[int, typer.Option()] = 0,
    device: Device = "auto",
    threads: TorchThreads = None,
    text_field: TextField = "text",
    force: Force = False,
    metrics_out: MetricsOut = None,
) -> None:
    """Quantize a checkpoint's weights with round-to-nearest, GPTQ, or a per-tensor plan under a GGUF size budget.

    The output keeps the checkpoint layout (packed codes or GGUF blocks, quantization_config in
    config.json) and loads back in itera; `itera evaluate` runs on it and `itera export --format
    gguf` writes its blocks as they are.

    Examples:

      itera quantize --model runs/teacher --method gptq --bits 4 --group-size 32 \\
        --calib pydocs@test --out runs/q4

      itera quantize --model runs/teacher --method gptq --gguf-type Q4_K \\
        --calib pydocs@test --out runs/q4k

      # a GGUF type per tensor, under a budget of 1858464 bytes of GGUF file
      itera quantize --model runs/teacher --method auto --target-bytes 1858464 \\
        --calib notes.txt --out runs/mixed
    """
    from itera.jobs.quantize import QuantizeOptions, run_quantize

    path, parent = model_input(model)
    opts = QuantizeOptions(model=path, out=out, method=method, bits=bits, group_size=group_size, sym=sym,
                           calib=calib, calib_samples=calib_samples, calib_seqlen=calib_seqlen, damp=damp,
                           act_order=act_order, gguf_type=gguf_type, target_bpw=target_bpw,
                           target_bytes=target_bytes, auto_types=auto_types, auto_base=auto_base, planner=planner,
                           plan=plan, quantize_embeddings=quantize_embeddings, eval_tokens=eval_tokens, seed=seed,
                           device=device, threads=threads, text_field=text_field, force=force)
    execute("quantize", run_quantize, opts.validate(), parent, metrics_out, summary=_summary)


def _summary(console, m: dict) -> None:
    line = f"{m['bits_per_weight']:.3f} bits per weight, {m['size_ratio']:.2f}x smaller"
    if m.get("gguf_bytes"):
        line += f"; as GGUF {m['gguf_bytes']:,} bytes, {m['gguf_bits_per_weight']:.3f} bits per weight over every tensor"
    if m["perplexity_after"]:
        line += f", held-out perplexity {m['perplexity_before']:.3f} -> {m['perplexity_after']:.3f} "
        if m.get("heldout_split"):  # which tokens: distill's held-out tail is another share of another text
            from itera.data import describe_heldout

            line += f"on {describe_heldout(m['heldout_split'])}"
        else:
            line += f"({m['eval_tokens']} tokens of the --calib text's tail)"
    console.log(line)
