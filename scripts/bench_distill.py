"""Training throughput of itera's loop against a plain PyTorch loop on the same model.

For one fixed model size, measures tokens/s of
  - plain:      forward, cross-entropy, backward, AdamW step (the reference loop),
  - itera-ce:   itera's Trainer with the distillation loss at alpha=0 (chunked, checkpointed CE),
  - itera-kd:   itera's Trainer distilling from a teacher twice as deep (alpha=0.5),
interleaved over several rounds; prints medians and the ratios to the plain loop as JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F

from itera.losses import DistillLoss
from itera.model.config import ModelConfig
from itera.model.llama import LlamaForCausalLM
from itera.train import TrainOptions, Trainer


def make(layers: int, seed: int) -> LlamaForCausalLM:
    cfg = ModelConfig(vocab_size=2048, hidden_size=128, intermediate_size=352, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    m = LlamaForCausalLM(cfg)
    m.init_weights(seed=seed)
    return m


def plain(model, ids, steps, batch, seq):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(0)
    t0 = time.perf_counter()
    for _ in range(steps):
        starts = torch.randint(0, ids.numel() - seq - 1, (batch,), generator=gen)
        b = torch.stack([ids[s:s + seq + 1] for s in starts.tolist()])
        loss = F.cross_entropy(model(b[:, :-1]).flatten(0, 1), b[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
    return steps * batch * seq / (time.perf_counter() - t0)


def itera_loop(model, ids, steps, batch, seq, teacher=None):
    opts = TrainOptions(steps=steps, batch_size=batch, seq_len=seq, warmup_steps=1)
    loss = DistillLoss(teacher, 0.5 if teacher is not None else 0.0, 2.0)
    return Trainer(model, loss, ids, opts).run()["tokens_per_s"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    a = ap.parse_args()
    ids = torch.randint(0, 2048, (200_000,), generator=torch.Generator().manual_seed(1))
    teacher = make(8, seed=2).requires_grad_(False).eval()
    results: dict[str, list[float]] = {"plain": [], "itera-ce": [], "itera-kd": []}
    for _ in range(a.rounds):
        results["plain"].append(plain(make(4, 0), ids, a.steps, a.batch, a.seq))
        results["itera-ce"].append(itera_loop(make(4, 0), ids, a.steps, a.batch, a.seq))
        results["itera-kd"].append(itera_loop(make(4, 0), ids, a.steps, a.batch, a.seq, teacher))
    med = {k: statistics.median(v) for k, v in results.items()}
    print(json.dumps({
        "benchmark": "distill",
        "model": {"layers": 4, "hidden": 128, "vocab": 2048, "params": make(4, 0).num_parameters()},
        "teacher_layers": 8, "batch": a.batch, "seq_len": a.seq, "steps_per_round": a.steps, "rounds": a.rounds,
        "threads": torch.get_num_threads(),
        "tokens_per_s_median": {k: round(v, 1) for k, v in med.items()},
        "ratio_to_plain": {k: round(v / med["plain"], 3) for k, v in med.items()},
        "tokens_per_s_samples": {k: [round(x, 1) for x in v] for k, v in results.items()},
    }, indent=2))


if __name__ == "__main__":
    main()
