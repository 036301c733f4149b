from __future__ import annotations

from typing import Annotated, Optional

import typer

from itera.cli._options import Device, Dtype, MetricsOut, RunnablePath, TextField, Threads, execute, model_input


def evaluate(
    dataset: Annotated[list[str], typer.Option(
        "--dataset", "-d", "--data", metavar="TEXT", help="Text to score; repeat for several: a "
        ".txt/.jsonl/.parquet file, pydocs[@split], wikitext-2, tinystories, or a datasets "
        "name[:config][@split]. Default split: test (tinystories: validation).")],
    model: RunnablePath = None,
    window: Annotated[Optional[int], typer.Option(
        help="Tokens per forward pass (context + targets). Default: 512, or the model's context if shorter.")] = None,
    stride: Annotated[Optional[int], typer.Option(
        help="Tokens each window advances and scores; smaller than --window. Default: half the window.")] = None,
    max_tokens: Annotated[Optional[int], typer.Option(
        "--max-tokens", "--eval-tokens", help="Score at most this many tokens of each dataset (its token stream "
        "is cut there, BOS included); --eval-tokens of distill and quantize means the same. Default: all.")] = None,
    bos: Annotated[Optional[bool], typer.Option("--bos/--no-bos", help="Put BOS in front of the text. "
                                                "Default: the tokenizer's add_bos_token.")] = None,
    dtype: Dtype = "float32",
    device: Device = "auto",
    threads: Threads = None,
    text_field: TextField = "text",
    metrics_out: MetricsOut = None,
) -> None:
    """Perplexity and bits per byte of a model on one or more datasets, with a sliding window.

    Every token after the first is scored once with up to WINDOW-1 tokens of context; the exact
    protocol is written into the record's params. Results go under metrics.datasets[<dataset>]:
    a file by its name and content (notes.txt#3f2a9c1b, the first 8 hex digits of its sha256),
    never its path, so a record means the same in any checkout.

    Examples:

      itera evaluate --model runs/teacher -d pydocs@test -d notes.txt --window 512

      itera export --model runs/teacher --format gguf --out m.gguf \\
        | itera evaluate -d pydocs@test
    """
    from itera.jobs.evaluate import EvaluateOptions, run_evaluate
    from itera.scoring import EvalOptions

    path, parent = model_input(model)
    opts = EvaluateOptions(model=path, datasets=dataset, dtype=dtype, device=device, threads=threads, text_field=text_field,
                           protocol=EvalOptions(window=window, stride=stride, max_tokens=max_tokens, bos=bos))
    execute("evaluate", run_evaluate, opts.validate(), parent, metrics_out, summary=_summary)


def _summary(console, metrics: dict) -> None:
    for spec, m in metrics["datasets"].items():
        console.log(f"{spec}: perplexity {m['perplexity']:.3f}, {m['bits_per_byte']:.4f} bits/byte over "
                    f"{m['tokens']} tokens ({m['tokens_per_s']:.0f} tokens/s)")
