from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from itera.commands._options import (Device, Dtype, MetricsOut, ModelPath, Threads, model_input, progress_bar,
                                     resolve_device)


def evaluate(
    dataset: Annotated[list[str], typer.Option(
        "--dataset", "-d", help="Text to score: a .txt/.jsonl/.parquet file, pydocs[@split], wikitext-2, "
        "tinystories or a datasets name[:config][@split]. Repeat for several.")],
    model: ModelPath = None,
    window: Annotated[Optional[int], typer.Option(
        help="Tokens per forward pass (context + targets). Default: 512, or the model's context if shorter.")] = None,
    stride: Annotated[Optional[int], typer.Option(
        help="Tokens each window advances and scores; smaller than --window. Default: half the window.")] = None,
    max_tokens: Annotated[Optional[int], typer.Option(help="Cut each token stream to this many tokens.")] = None,
    bos: Annotated[Optional[bool], typer.Option("--bos/--no-bos", help="Put BOS in front of the text. "
                                                "Default: the tokenizer's add_bos_token.")] = None,
    dtype: Dtype = "float32",
    device: Device = "cpu",
    threads: Threads = None,
    metrics_out: MetricsOut = None,
) -> None:
    """Perplexity and bits per byte of a model on one or more datasets, with a sliding window.

    Every token after the first is scored once with up to WINDOW-1 tokens of context; the exact
    protocol is written into the record's params. Results go under metrics.datasets[<dataset>].
    """
    from itera import record
    from itera.data import load_text
    from itera.evaluate import EvalOptions, evaluate_text, resolve_bos
    from itera.model.checkpoint import check_against_config, checkpoint_format, load_config, read_headers
    from itera.runtime import check_model_path, open_runtime

    opts = EvalOptions(window=window, stride=stride, max_tokens=max_tokens, bos=bos).validate()
    path, parent = model_input(model)
    run = record.Run("evaluate", parent=parent)
    # Cheap checks of the model first, then the data, then the expensive load.
    fmt = check_model_path(path)
    if fmt == "checkpoint":
        cfg = load_config(path)
        check_against_config(cfg, read_headers(path), path)
        opts.resolve(cfg.max_position_embeddings)
    sources = {spec: load_text(spec, purpose="eval") for spec in dict.fromkeys(dataset)}
    run.device = resolve_device(device)
    rt = open_runtime(path, dtype=dtype, device=run.device, threads=threads)
    opts = opts.resolve(rt.max_context)
    used_bos = resolve_bos(rt.tokenizer, opts)

    results = {}
    with progress_bar(training=False) as prog:
        for spec, src in sources.items():
            task = prog.add_task(f"evaluate {spec}", total=None)
            results[spec] = evaluate_text(rt, src.text, opts, source=spec,
                                          progress=lambda done, total, t=task: prog.update(t, completed=done, total=total))
    rt.close()
    params = {**opts.as_params(), "bos": used_bos, "model": str(path), "runtime": rt.name, "dtype": dtype,
              "device": run.device, "threads": threads,
              "datasets": {spec: src.description for spec, src in sources.items()}}
    artifact = record.describe_artifact(path, "checkpoint", checkpoint_format(path)) if fmt == "checkpoint" else \
        record.describe_artifact(path, "file", fmt)
    rec = run.record(artifact, {"datasets": results}, params)
    for spec, m in results.items():
        print(f"{spec}: perplexity {m['perplexity']:.3f}, {m['bits_per_byte']:.4f} bits/byte over "
              f"{m['tokens']} tokens ({m['tokens_per_s']:.0f} tokens/s)", file=sys.stderr)
    record.emit(rec, metrics_out=metrics_out)

