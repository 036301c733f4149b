from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from itera.cli._options import Device, Force, MetricsOut, TextField, TorchThreads, TrainDtype, execute

Int = Optional[int]


def distill(
    data: Annotated[str, typer.Option("--data", "--dataset", "-d", metavar="TEXT", help="Training text: a "
                                      ".txt/.jsonl/.parquet file, pydocs[@split] (default train) or a datasets "
                                      "name. Its tail (--holdout) is held out.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Directory for the student checkpoint.")],
    teacher: Annotated[Optional[Path], typer.Option("--teacher", "--model", "-m", help="Teacher checkpoint. "
                                                    "Default: the record on stdin. Omit with --alpha 0 --tokenizer "
                                                    "to train from scratch.")] = None,
    student: Annotated[Optional[str], typer.Option(help="Student preset (half, quarter, narrow, demo-teacher) "
                                                   "or a YAML file with the same fields.")] = None,
    layers: Annotated[Int, typer.Option(help="Student layers (overrides the preset).")] = None,
    hidden: Annotated[Int, typer.Option(help="Student hidden size.")] = None,
    heads: Annotated[Int, typer.Option(help="Student attention heads.")] = None,
    kv_heads: Annotated[Int, typer.Option(help="Student key/value heads.")] = None,
    ffn: Annotated[Int, typer.Option(help="Student FFN (intermediate) size.")] = None,
    init: Annotated[Optional[str], typer.Option(help="random | layers | prune. Default: layers when the student "
                                                "has the teacher's width, else prune; random without a teacher.")] = None,
    layer_ids: Annotated[Optional[str], typer.Option(help="Teacher layers to keep, e.g. 0,2,5 (default evenly spaced).")] = None,
    calib_batches: Annotated[int, typer.Option(help="--init prune: batches of training text (up to 8 sequences "
                                               "each) that rank the teacher's heads and channels.")] = 8,
    alpha: Annotated[float, typer.Option(help="Weight of the KL term; 0 trains on cross-entropy alone.")] = 0.5,
    temperature: Annotated[float, typer.Option(help="Softmax temperature of the KL term.")] = 2.0,
    kl: Annotated[str, typer.Option(help="forward: KL(teacher||student); reverse: KL(student||teacher); jsd: "
                                    "generalized Jensen-Shannon (GKD) with --jsd-beta.")] = "forward",
    jsd_beta: Annotated[float, typer.Option(help="--kl jsd's mixture weight beta in (0, 1).")] = 0.5,
    teacher_cache: Annotated[Optional[Path], typer.Option(
        "--teacher-cache", metavar="DIR", help="The teacher's top-K distribution over the training text, "
        "built by `itera distill cache` (or here, from --teacher, when DIR does not exist) and reused by any "
        "student: no teacher forward pass per step. Without --teacher the student starts from --init random "
        "and takes the cache's tokenizer.")] = None,
    top_k: Annotated[Int, typer.Option(help="Distill from the teacher's K most likely tokens and the rest's "
                                       "mass: with --teacher-cache at most its K (default its K; 64 when "
                                       "this run builds it); with --teacher alone the live teacher cut to K.")] = None,
    hidden_weight: Annotated[float, typer.Option(help="Weight of a hidden-state term: each student layer's "
                                                 "output, through a learned linear map, vs its teacher layer's "
                                                 "(--layer-ids), MSE relative to the teacher's. 0: off.")] = 0.0,
    tokenizer: Annotated[Optional[str], typer.Option(help="Without a teacher: a tokenizer.json, or bpe:VOCAB_SIZE "
                                                     "to train a byte-level BPE on the training text.")] = None,
    steps: Annotated[int, typer.Option(help="Optimizer steps.")] = 200,
    batch_size: Annotated[int, typer.Option(help="Sequences per step, over all processes.")] = 16,
    grad_accum: Annotated[int, typer.Option(help="Micro-batches per step on each process.")] = 1,
    seq_len: Annotated[int, typer.Option(help="Tokens per training sequence.")] = 128,
    lr: Annotated[float, typer.Option(help="Peak learning rate (AdamW).")] = 1e-3,
    warmup_steps: Annotated[int, typer.Option(help="Linear warm-up steps before cosine decay.")] = 10,
    weight_decay: Annotated[float, typer.Option()] = 0.1,
    grad_clip: Annotated[float, typer.Option(help="Max gradient norm.")] = 1.0,
    seed: Annotated[int, typer.Option()] = 0,
    holdout: Annotated[float, typer.Option(help="Fraction of the text held out.")] = 0.05,
    eval_tokens: Annotated[int, typer.Option(help="Held-out tokens scored for the record's perplexities (at "
                                             "most; what `evaluate --eval-tokens` means too).")] = 8192,
    eval_every: Annotated[int, typer.Option(help="Steps between held-out evaluations (0: end only).")] = 0,
    save_every: Annotated[int, typer.Option(help="Steps between resumable checkpoints in OUT.train-state/.")] = 0,
    resume: Annotated[bool, typer.Option("--resume", help="Continue from OUT.train-state/ where a run stopped.")] = False,
    device: Device = "auto",
    threads: TorchThreads = None,
    dtype: TrainDtype = "auto",
    save_dtype: Annotated[str, typer.Option("--save-dtype", help="dtype of the saved student: auto (the teacher's "
                                            "stored dtype; float32 without a teacher), float32, float16 or "
                                            "bfloat16. Training runs in float32 (--dtype) either way.")] = "auto",
    text_field: TextField = "text",
    force: Force = False,
    metrics_out: MetricsOut = None,
) -> None:
    """Distill a teacher into a smaller student (or, with --alpha 0 and no teacher, train from scratch).

    loss = alpha * T^2 * KL(teacher_T || student_T) + (1 - alpha) * CE. With --teacher-cache or
    --top-k the KL is over the teacher's top K tokens and one bucket for the rest. Runs unchanged, with the
    same flags, under `torchrun --nproc-per-node N -m itera distill` (DistributedDataParallel; only
    rank 0 writes).

    Examples:

      itera distill --teacher runs/teacher --student quarter --data notes.txt \\
        --out runs/student --steps 500

      # one teacher pass, kept; then any number of students from it
      itera distill cache --teacher runs/teacher --data notes.txt \\
        --out runs/t-cache
      itera distill --teacher-cache runs/t-cache --student quarter \\
        --data notes.txt --out runs/student

      # train a small model from scratch (no teacher)
      itera distill --alpha 0 --tokenizer bpe:4096 --layers 4 --hidden 192 \\
        --heads 6 --data notes.txt --out runs/scratch
    """
    from itera import record
    from itera.jobs.distill import DistillOptions, run_distill
    from itera.errors import UsageError
    from itera.runtime import resolve_device
    from itera.train import TrainOptions, init_distributed

    try:
        ids = [int(x) for x in layer_ids.split(",")] if layer_ids else None
    except ValueError:
        raise UsageError(f"--layer-ids must be comma-separated integers, e.g. 0,2,5 (got {layer_ids!r})") from None
    train = TrainOptions(steps=steps, batch_size=batch_size, grad_accum=grad_accum, seq_len=seq_len, lr=lr,
                         warmup_steps=warmup_steps, weight_decay=weight_decay, grad_clip=grad_clip, seed=seed,
                         eval_every=eval_every, save_every=save_every, dtype=dtype).validate()
    parent = record.read_parent() if teacher is None and tokenizer is None and teacher_cache is None else None
    if parent is not None and (parent.get("artifact") or {}).get("kind") == "teacher-cache":
        teacher_cache = Path(parent["artifact"]["path"])  # `itera distill cache ... | itera distill ...`
    elif teacher is not None or parent is not None:
        teacher = record.input_path(teacher, parent, "--teacher")  # a path, org/name from the HF cache, or stdin
    opts = DistillOptions(data=data, out=out, teacher=teacher, student=student, layers=layers, hidden=hidden,
                          heads=heads, kv_heads=kv_heads, ffn=ffn, init=init, layer_ids=ids, alpha=alpha,
                          temperature=temperature, kl=kl, jsd_beta=jsd_beta, teacher_cache=teacher_cache, top_k=top_k,
                          hidden_weight=hidden_weight, tokenizer=tokenizer, holdout=holdout, eval_tokens=eval_tokens,
                          calib_batches=calib_batches, resume=resume, train=train, force=force,
                          text_field=text_field, threads=threads, save_dtype=save_dtype).validate()
    dist = init_distributed(resolve_device(device))
    opts.device = dist.device
    execute("distill", run_distill, opts, parent, metrics_out, summary=_summary, dist=dist)


def _summary(console, m: dict) -> None:
    who = "student" if "teacher_perplexity" in m or "teacher_cache" in m else "model"
    line = (f"{who} perplexity {m['student_perplexity']:.3f} (from {m['init_student_perplexity']:.3f} at step 0)"
            + (f", teacher {m['teacher_perplexity']:.3f}, top-1 agreement {m['top1_agreement']:.3f}"
               if "teacher_perplexity" in m else ""))
    if "heldout_split" in m:  # which tokens: the figures of distill, quantize and evaluate differ in that
        from itera.data import describe_heldout

        line += f", on {describe_heldout(m['heldout_split'])}"
    else:
        line += f", on {m['heldout_tokens']} held-out tokens of the --data text's tail"
    if m.get("student_dtype", "float32") != "float32":
        line += f"; measured as saved, in {m['student_dtype']}"
    console.log(line)


def cache(
    teacher: Annotated[Path, typer.Option("--teacher", "--model", "-m", help="Teacher: a checkpoint directory "
                                          "(run through torch) or a GGUF file (run through llama.cpp; needs "
                                          "--tokenizer).")],
    data: Annotated[str, typer.Option("--data", "--dataset", "-d", metavar="TEXT", help="Training text, as "
                                      "`itera distill --data` takes it; its tail (--holdout) is left out.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Directory for the cache.")],
    top_k: Annotated[int, typer.Option(help="Token ids (with their log-probabilities) kept per position.")] = 64,
    seq_len: Annotated[int, typer.Option(help="Tokens per window; students must train with the same "
                                         "--seq-len.")] = 128,
    holdout: Annotated[float, typer.Option(help="Fraction of the text held out (as the students' --holdout).")] = 0.05,
    tokenizer: Annotated[Optional[Path], typer.Option(help="A GGUF teacher's tokenizer: the tokenizer.json or "
                                                      "checkpoint directory of the model it was made from.")] = None,
    batch_size: Annotated[int, typer.Option(help="Windows per teacher forward pass.")] = 8,
    device: Device = "auto",
    threads: TorchThreads = None,
    text_field: TextField = "text",
    force: Force = False,
    metrics_out: MetricsOut = None,
) -> None:
    """Run a teacher once over the training text and keep its top-K distribution per position.

    Students then train from the cache with `itera distill --teacher-cache DIR`, without loading
    the teacher. The cache is keyed by the teacher's, the tokenizer's and the text's hashes, the
    sequence layout (--seq-len, --holdout) and K; a student run that differs is refused.

    Examples:

      itera distill cache --teacher runs/teacher --data notes.txt --out runs/t-cache

      # a GGUF teacher, through llama.cpp
      itera distill cache --teacher big.gguf --tokenizer runs/teacher \\
        --data notes.txt --top-k 32 --out runs/t-cache
    """
    from itera.jobs.distill_cache import CacheOptions, run_cache
    from itera.runtime import resolve_device

    opts = CacheOptions(teacher=teacher, data=data, out=out, top_k=top_k, seq_len=seq_len, holdout=holdout,
                        tokenizer=tokenizer, batch_size=batch_size, device=resolve_device(device), threads=threads,
                        text_field=text_field, force=force).validate()
    execute("distill cache", run_cache, opts, None, metrics_out, summary=_cache_summary)


def _cache_summary(console, m: dict) -> None:
    console.log(f"teacher cache: {m['tokens']:,} tokens in {m['windows']:,} windows, top {m['top_k']}, "
                f"{m['bytes']:,} bytes ({m['bytes_per_token']:.0f} per token), built in {m['build_seconds']:.1f} s "
                f"({m['teacher_tokens_per_s']:,.0f} teacher tokens/s through {m['runtime']})")
