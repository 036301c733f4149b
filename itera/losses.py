"""Losses and divergences, each written once and used by every recipe that needs it.

- :func:`kl_div`: KL(p || q) per position from log-probabilities. Distillation's loss and its
  held-out figure, quantization's per-layer sensitivity and DPO's distance to the reference
  all use it.
- :class:`DistillLoss`: Hinton et al. 2015, ``alpha * T^2 * KL + (1 - alpha) * CE``, computed in
  chunks of positions under activation checkpointing so a long vocabulary never materialises
  ``(B, T, V)`` for the whole batch in the backward pass.
- :func:`dpo_loss`: Rafailov et al. 2023 (sigmoid, with label smoothing) and IPO (Azar et al. 2023).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from itera.errors import UsageError

DPO_LOSSES = ("sigmoid", "ipo")


def kl_div(p_logp: torch.Tensor, q_logp: torch.Tensor) -> torch.Tensor:
    """KL(p || q) = sum_v p (log p - log q) over the last axis; inputs are log-probabilities (..., V)."""
    return (p_logp.exp() * (p_logp - q_logp)).sum(-1)


# --------------------------------------------------------------------------- distillation


def _chunk_loss(s_hidden, t_hidden, targets, s_head, t_head, alpha: float, temperature: float, reverse: bool):
    """(sum CE, sum KL) over one chunk of positions. Runs under activation checkpointing."""
    s_logits = F.linear(s_hidden, s_head).float()  # (B, c, V)
    ce = F.cross_entropy(s_logits.flatten(0, 1), targets.flatten(), reduction="sum")
    if alpha == 0:
        return ce, torch.zeros((), device=ce.device)
    with torch.no_grad():
        t_logits = F.linear(t_hidden, t_head).float()
    s_logp = F.log_softmax(s_logits / temperature, dim=-1)
    t_logp = F.log_softmax(t_logits / temperature, dim=-1)
    # reverse: KL(student || teacher), mode-seeking; forward: KL(teacher || student), Hinton's choice
    kl = kl_div(s_logp, t_logp) if reverse else kl_div(t_logp, s_logp)
    return ce, kl.sum()


class DistillLoss:
    """``loss_fn`` for the Trainer: mean over tokens of alpha*T^2*KL + (1-alpha)*CE."""

    def __init__(self, teacher, alpha: float, temperature: float, reverse: bool = False, chunk: int = 128):
        self.teacher, self.alpha, self.T, self.reverse, self.chunk = teacher, alpha, temperature, reverse, chunk

    def __call__(self, model, batch: torch.Tensor):
        from torch.utils.checkpoint import checkpoint

        x, y = batch[:, :-1], batch[:, 1:]
        s_hidden = model(x, return_hidden=True)  # (B, T, H): through the DDP wrapper when distributed
        student = model.module if hasattr(model, "module") else model
        t_hidden, t_head = None, None
        if self.alpha > 0:
            with torch.no_grad():
                t_hidden = self.teacher(x, return_hidden=True)
            t_head = self.teacher.lm_head.weight
        ce_sum, kl_sum = 0.0, 0.0
        for i in range(0, x.shape[1], self.chunk):
            sl = slice(i, i + self.chunk)
            ce, kl = checkpoint(_chunk_loss, s_hidden[:, sl], None if t_hidden is None else t_hidden[:, sl], y[:, sl],
                                student.lm_head.weight, t_head, self.alpha, self.T, self.reverse, use_reentrant=False)
            ce_sum, kl_sum = ce_sum + ce, kl_sum + kl
        n = y.numel()
        ce_mean, kl_mean = ce_sum / n, kl_sum / n
        loss = self.alpha * self.T ** 2 * kl_mean + (1 - self.alpha) * ce_mean
        return loss, {"ce": float(ce_mean.detach()), "kl": float(kl_mean.detach())}


# --------------------------------------------------------------------------- preferences


def dpo_loss(pi_c: torch.Tensor, pi_r: torch.Tensor, ref_c: torch.Tensor, ref_r: torch.Tensor, beta: float,
             kind: str = "sigmoid", label_smoothing: float = 0.0) -> tuple[torch.Tensor, dict]:
    """Mean loss over pairs and per-pair figures: rewards beta*(log pi - log ref) and the margin.

    ``h = [log pi(y_w|x) - log ref(y_w|x)] - [log pi(y_l|x) - log ref(y_l|x)]``;
    sigmoid: ``-(1 - eps) log sigmoid(beta h) - eps log sigmoid(-beta h)``; ipo: ``(h - 1/(2 beta))^2``.
    """
    h = (pi_c - ref_c) - (pi_r - ref_r)
    if kind == "sigmoid":
        losses = -(1 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)
    elif kind == "ipo":
        losses = (h - 1 / (2 * beta)) ** 2
    else:
        raise UsageError(f"unknown --loss {kind!r}; use sigmoid or ipo")
    chosen_r, rejected_r = beta * (pi_c - ref_c).detach(), beta * (pi_r - ref_r).detach()
    return losses.mean(), {"chosen_rewards": chosen_r, "rejected_rewards": rejected_r}


def reward_accuracy(margins: torch.Tensor) -> float:
    """Share of pairs whose chosen reward beats the rejected one; a tie counts as half."""
    return ((margins > 0).float() + 0.5 * (margins == 0).float()).mean().item()
