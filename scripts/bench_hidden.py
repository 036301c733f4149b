"""What ``itera distill --hidden-weight`` buys: held-out perplexity and step time with and without it.

Trains a small teacher from scratch on a text file (``itera distill --alpha 0 --tokenizer bpe:N``),
then distills it twice into the same narrower and shallower student (pruned from the teacher:
half its layers, half its width), once with ``--hidden-weight 0`` (logits only: KL + CE) and once
with ``--hidden-weight W``, for the same steps, seed and batches. Every run goes through the
command's own job (:func:`itera.jobs.distill.run_distill`), so the figures are the records': the
held-out perplexity is measured on the text's held-out tail, the step time is the training
seconds over the steps (held-out evaluation excluded). Prints one JSON object.

The text is read where it lies (``--data PATH``); nothing is copied. One torch thread by
default: models this small are no faster on two, and far slower when the machine is shared.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from itera.jobs.distill import DistillOptions, run_distill
from itera.prune import evenly_spaced
from itera.train import TrainOptions


def distill(data: str, out: Path, steps: int, args, **fields) -> dict:
    train = TrainOptions(steps=steps, batch_size=args.batch, seq_len=args.seq_len, lr=args.lr, warmup_steps=10,
                         seed=args.seed)
    opts = DistillOptions(data=data, out=out, train=train, threads=args.threads, eval_tokens=args.eval_tokens,
                          **fields)
    t0 = time.perf_counter()
    outcome = run_distill(opts)
    m = outcome.metrics
    res = {"wall_seconds": round(time.perf_counter() - t0, 1), "steps": steps,
           "step_seconds": round(m["train_seconds"] / steps, 4),
           "heldout_perplexity": round(m["student_perplexity"], 3),
           "init_heldout_perplexity": round(m["init_student_perplexity"], 3), "params": m["student_params"]}
    for k in ("kl_to_teacher", "top1_agreement", "final_hidden_loss"):
        if k in m:
            res[k] = round(m[k], 4)
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True, help="a plain-text file to train and evaluate on (its tail is held out)")
    ap.add_argument("--hidden-weight", type=float, default=1.0, help="the weight compared against 0")
    ap.add_argument("--teacher-steps", type=int, default=200)
    ap.add_argument("--steps", type=int, default=150, help="distillation steps of each student")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--vocab", type=int, default=512, help="BPE vocabulary trained for the teacher")
    ap.add_argument("--eval-tokens", type=int, default=8192)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--workdir", type=Path, default=None, help="keep the models here (default: a temporary directory)")
    a = ap.parse_args()
    data = str(Path(a.data).resolve())
    torch.set_num_threads(a.threads)
    with tempfile.TemporaryDirectory() as tmp:
        work = a.workdir or Path(tmp)
        teacher = work / "teacher"
        t = distill(data, teacher, a.teacher_steps, a, alpha=0.0, tokenizer=f"bpe:{a.vocab}", layers=4, hidden=128,
                    heads=4, kv_heads=2, ffn=384, force=True)
        student = dict(teacher=teacher, layers=2, hidden=64, heads=2, kv_heads=1, ffn=192, init="prune", alpha=0.5,
                       temperature=2.0, force=True)
        plain = distill(data, work / "student-logits", a.steps, a, hidden_weight=0.0, **student)
        hidden = distill(data, work / "student-hidden", a.steps, a, hidden_weight=a.hidden_weight, **student)
    print(json.dumps({
        "benchmark": "hidden-state distillation",
        "data": Path(a.data).name, "threads": a.threads, "batch": a.batch, "seq_len": a.seq_len, "lr": a.lr,
        "seed": a.seed, "eval_tokens": a.eval_tokens,
        "teacher": {"layers": 4, "hidden": 128, "heads": 4, "kv_heads": 2, "ffn": 384, "vocab": a.vocab, **t},
        "student": {"layers": 2, "hidden": 64, "heads": 2, "kv_heads": 1, "ffn": 192, "init": "prune",
                    "teacher_layers_kept": evenly_spaced(4, 2), "alpha": 0.5, "temperature": 2.0},
        "hidden_weight_0": plain,
        f"hidden_weight_{a.hidden_weight:g}": hidden,
        "perplexity_ratio_hidden_to_logits": round(hidden["heldout_perplexity"] / plain["heldout_perplexity"], 4),
        "step_time_ratio_hidden_to_logits": round(hidden["step_seconds"] / plain["step_seconds"], 3),
    }, indent=2))


if __name__ == "__main__":
    main()
