"""A small, deterministic language-model training loop (AdamW, warm-up + cosine schedule).

Used by the demo to make its model from scratch; ``distill`` builds on it.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from itera.errors import DataError, UsageError


@dataclass
class TrainOptions:
    steps: int = 300
    batch_size: int = 16
    seq_len: int = 128
    lr: float = 3e-3
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    warmup_steps: int = 20
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    seed: int = 0

    def validate(self) -> "TrainOptions":
        for name in ("steps", "batch_size", "seq_len"):
            if getattr(self, name) < 1:
                raise UsageError(f"--{name.replace('_', '-')} must be at least 1 (got {getattr(self, name)})")
        if not self.lr > 0:
            raise UsageError(f"--lr must be positive (got {self.lr})")
        return self

    def as_params(self) -> dict:
        return asdict(self)


def lr_at(step: int, opts: TrainOptions) -> float:
    """Linear warm-up to ``lr`` then cosine decay to ``lr * min_lr_ratio`` at the last step."""
    if step < opts.warmup_steps:
        return opts.lr * (step + 1) / opts.warmup_steps
    span = max(1, opts.steps - opts.warmup_steps)
    progress = min(1.0, (step - opts.warmup_steps) / span)
    return opts.lr * (opts.min_lr_ratio + (1 - opts.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def random_crops(ids: torch.Tensor, batch_size: int, seq_len: int, gen: torch.Generator) -> torch.Tensor:
    """(batch_size, seq_len + 1) windows cut at random offsets of a 1-D token stream."""
    if ids.numel() < seq_len + 2:
        raise DataError(f"the training text has {ids.numel()} tokens; at least --seq-len + 2 = {seq_len + 2} are needed")
    starts = torch.randint(0, ids.numel() - seq_len - 1, (batch_size,), generator=gen)
    return torch.stack([ids[s: s + seq_len + 1] for s in starts.tolist()])


def train_lm(model: torch.nn.Module, ids: torch.Tensor, opts: TrainOptions,
             progress: Callable[[int, float], None] | None = None) -> dict:
    """Train ``model`` on next-token cross-entropy over random crops of ``ids``; returns measured figures."""
    opts.validate()
    gen = torch.Generator().manual_seed(opts.seed)
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    optim = torch.optim.AdamW([{"params": decay, "weight_decay": opts.weight_decay},
                               {"params": no_decay, "weight_decay": 0.0}], lr=opts.lr, betas=(0.9, 0.95))
    model.train()
    losses = []
    t0 = time.perf_counter()
    for step in range(opts.steps):
        for group in optim.param_groups:
            group["lr"] = lr_at(step, opts)
        batch = random_crops(ids, opts.batch_size, opts.seq_len, gen)
        logits = model(batch[:, :-1])
        loss = F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), batch[:, 1:].reshape(-1))
        optim.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), opts.grad_clip)
        optim.step()
        losses.append(loss.item())
        if progress:
            progress(step + 1, losses[-1])
    seconds = time.perf_counter() - t0
    model.eval()
    tokens = opts.steps * opts.batch_size * opts.seq_len
    return {"final_loss": sum(losses[-10:]) / len(losses[-10:]), "first_loss": losses[0],
            "tokens_seen": tokens, "tokens_per_s": tokens / seconds, "seconds": seconds}
