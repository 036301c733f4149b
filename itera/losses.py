"""Losses and divergences, each written once and used by every recipe that needs it.

- :func:`kl_div`: KL(p || q) per position from log-probabilities. Distillation's loss and its
  held-out figure, quantization's per-layer sensitivity and DPO's distance to the reference
  all use it.
- :class:`DistillLoss`: Hinton et al. 2015, ``alpha * T^2 * KL + (1 - alpha) * CE``, computed in
  chunks of positions under activation checkpointing so a long vocabulary never materialises
  ``(B, T, V)`` for the whole batch in the backward pass; optionally plus ``hidden_weight`` times
  an intermediate-layer term (:func:`hidden_state_loss`, Minitron-style hidden-state distillation:
  Muralidharan et al. 2024) through a learned :class:`HiddenProjection`.
- :func:`dpo_loss`: Rafailov et al. 2023 (sigmoid, with label smoothing) and IPO (Azar et al. 2023).
- :func:`kto_loss`: Ethayarajh et al. 2024, for responses judged one at a time (thumbs up/down).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from itera.errors import UsageError

DPO_LOSSES = ("sigmoid", "ipo")


def kl_div(p_logp: torch.Tensor, q_logp: torch.Tensor) -> torch.Tensor:
    """KL(p || q) = sum_v p (log p - log q) over the last axis; inputs are log-probabilities (..., V)."""
    return (p_logp.exp() * (p_logp - q_logp)).sum(-1)


DIVERGENCES = ("forward", "reverse", "jsd")


def divergence(t_logp: torch.Tensor, s_logp: torch.Tensor, kind: str = "forward", beta: float = 0.5) -> torch.Tensor:
    """Teacher-to-student divergence per position over the last axis (log-probabilities).

    forward: KL(teacher || student) (Hinton et al.); reverse: KL(student || teacher), mode-seeking;
    jsd: the generalized Jensen-Shannon divergence of GKD (Agarwal et al. 2024),
    ``beta KL(t || m) + (1 - beta) KL(s || m)`` with ``m = beta t + (1 - beta) s``: forward KL's
    behaviour as beta -> 0 (scaled by beta), reverse KL's as beta -> 1.
    """
    if kind == "forward":
        return kl_div(t_logp, s_logp)
    if kind == "reverse":
        return kl_div(s_logp, t_logp)
    if kind == "jsd":
        m = torch.logaddexp(t_logp + math.log(beta), s_logp + math.log(1 - beta))
        return beta * kl_div(t_logp, m) + (1 - beta) * kl_div(s_logp, m)
    raise UsageError(f"unknown --kl {kind!r}; use forward, reverse or jsd")


def bucket_logp(t_logp: torch.Tensor, t_rest: torch.Tensor, rest_tokens: int, temperature: float,
                rest_powers: torch.Tensor | None = None) -> torch.Tensor:
    """A teacher's sparse distribution (K log-probabilities at temperature 1 and the log of the
    rest's mass) as K + 1 log-probabilities at ``temperature``.

    The K ids are tempered exactly (``log p / T``, renormalised). The rest's tokens are not known one
    by one; at temperature T their mass becomes ``sum_rest p^(1/T)`` before renormalising. With the
    cache's power sums (``rest_powers``: ``log sum_rest p^b`` at ``b`` in
    ``itera.teacher_cache.REST_BETAS``), that is exact at those temperatures and interpolated
    linearly in ``b = 1/T`` between them, with ``b = 0`` (``log rest_tokens``) and ``b = 1`` (the
    rest's mass) as exact ends: ``log sum p^b`` is convex in ``b``, so the interpolation is an upper
    bound, tight on the grid. Without them (or below T = 1) the rest is taken as spread evenly over
    ``rest_tokens`` tokens: ``n (rest / n) ** (1 / T)``, exact when it is flat, an upper bound
    otherwise (far above the truth for a peaked teacher at high T). At T = 1 all of it is exact.
    """
    rest = t_rest.unsqueeze(-1)
    if temperature == 1.0:
        return torch.cat([t_logp, rest], -1)
    n = max(rest_tokens, 1)
    logn = math.log(n)
    b = 1.0 / temperature
    if rest_powers is not None and b < 1.0 and rest_tokens > 0:
        from itera.teacher_cache import REST_BETAS

        grid = (0.0, *REST_BETAS, 1.0)
        j = max(i for i in range(len(grid) - 1) if grid[i] <= b)
        col = lambda i: (torch.full_like(t_rest, logn) if i == 0 else t_rest if i == len(grid) - 1  # noqa: E731
                         else rest_powers[..., i - 1])
        w = (b - grid[j]) / (grid[j + 1] - grid[j])
        tempered = ((1 - w) * col(j) + w * col(j + 1)).unsqueeze(-1)
    else:
        tempered = logn + (rest - logn) / temperature
    return torch.log_softmax(torch.cat([t_logp / temperature, tempered], -1), -1)


def student_bucket_logp(s_logits: torch.Tensor, ids: torch.Tensor, vocab: int, temperature: float,
                        lse: torch.Tensor | None = None, picked: torch.Tensor | None = None) -> torch.Tensor:
    """The student's tempered distribution over the true vocabulary, gathered into the teacher's
    buckets: the K ids' log-probabilities and the log of everything else's mass.

    The rest is ``log(1 - sum_K p)`` from the K ids alone, so the only passes over the vocabulary
    are one log-sum-exp (which a caller at T = 1 shares with the cross-entropy: ``lse``) and one
    gather (``picked``: the K ids' logits, when the caller gathered them already). The rest is
    floored at ``REST_FLOOR`` (float32 cannot tell a smaller rest from 0 through ``1 - sum``), and
    is empty (log mass -80, as the cache floors it) when K covers the whole vocabulary."""
    z = s_logits[..., :vocab] if s_logits.shape[-1] != vocab else s_logits
    if lse is None or temperature != 1.0:
        lse = torch.logsumexp(z / temperature if temperature != 1.0 else z, -1, keepdim=True)
    if picked is None:
        picked = z.gather(-1, ids)
    top = picked / temperature - lse if temperature != 1.0 else picked - lse
    if ids.shape[-1] >= vocab:  # every token has its bucket: the rest is empty
        return torch.cat([top, torch.full_like(top[..., :1], _EMPTY_REST)], -1)
    covered = torch.logsumexp(top, -1, keepdim=True).clamp(max=_REST_COVER)
    return torch.cat([top, torch.log(-torch.expm1(covered))], -1)


REST_FLOOR = 1e-6  # the smallest rest mass the student's bucket distribution keeps
_REST_COVER = math.log1p(-REST_FLOOR)
_EMPTY_REST = -80.0  # the teacher cache's floor for an empty rest


# --------------------------------------------------------------------------- distillation


def _chunk_loss(s_hidden, t_hidden, targets, s_head, t_head, alpha: float, temperature: float, kind: str,
                beta: float = 0.5):
    """(sum CE, sum KL) over one chunk of positions. Runs under activation checkpointing."""
    s_logits = F.linear(s_hidden, s_head).float()  # (B, c, V)
    ce = F.cross_entropy(s_logits.flatten(0, 1), targets.flatten(), reduction="sum")
    if alpha == 0:
        return ce, torch.zeros((), device=ce.device)
    with torch.no_grad():
        t_logits = F.linear(t_hidden, t_head).float()
    s_logp = F.log_softmax(s_logits / temperature, dim=-1)
    t_logp = F.log_softmax(t_logits / temperature, dim=-1)
    return ce, divergence(t_logp, s_logp, kind, beta).sum()


def _sparse_chunk_loss(s_hidden, targets, ids, t_logp, t_rest, t_powers, s_head, alpha: float, temperature: float,
                       kind: str, beta: float, vocab: int):
    """(sum CE, sum divergence) over one chunk of positions against the teacher's K + 1 buckets.

    The cross-entropy and the student's buckets share one log-sum-exp over the logits and one
    gather (the target and the K ids together), so a step costs little more than cross-entropy's."""
    s_logits = F.linear(s_hidden, s_head).float()
    lse = torch.logsumexp(s_logits, -1, keepdim=True)
    if alpha == 0:
        picked = s_logits.gather(-1, targets.unsqueeze(-1))
        return (lse - picked).sum(), torch.zeros((), device=lse.device)
    picked = s_logits.gather(-1, torch.cat([targets.unsqueeze(-1), ids], -1))
    ce = (lse - picked[..., :1]).sum()
    shared = lse if s_logits.shape[-1] == vocab else None  # a padded head: the true vocabulary's own
    p = bucket_logp(t_logp, t_rest, vocab - ids.shape[-1], temperature, t_powers)
    q = student_bucket_logp(s_logits, ids, vocab, temperature, lse=shared, picked=picked[..., 1:])
    return ce, divergence(p, q, kind, beta).sum()


class SparseDistillLoss:
    """``loss_fn`` for the Trainer over batches of window numbers (B,): the rows of ``windows``
    (N, L + 1) they name are the tokens, and ``targets(rows, x)`` gives the teacher's top-K
    distribution for them (``ids``, ``logp``, ``rest``: from a teacher cache, or from a live
    teacher cut to the same K). Mean over tokens of ``alpha T^2 D + (1 - alpha) CE``, chunked
    and checkpointed like :class:`DistillLoss`."""

    def __init__(self, windows: torch.Tensor, targets, vocab: int, alpha: float, temperature: float,
                 kind: str = "forward", beta: float = 0.5, chunk: int = 128):
        self.windows, self.targets, self.vocab = windows, targets, vocab
        self.alpha, self.T, self.kind, self.beta, self.chunk = alpha, temperature, kind, beta, chunk

    def __call__(self, model, rows: torch.Tensor):
        from torch.utils.checkpoint import checkpoint

        batch = self.windows[rows.cpu()].to(rows.device)
        x, y = batch[:, :-1], batch[:, 1:]
        t = self.targets(rows, x).to(x.device)
        s_hidden = model(x, return_hidden=True)
        student = model.module if hasattr(model, "module") else model
        ce_sum, kl_sum = 0.0, 0.0
        for i in range(0, x.shape[1], self.chunk):
            sl = slice(i, i + self.chunk)
            powers = t.rest_powers[:, sl] if t.rest_powers is not None else None
            ce, kl = checkpoint(_sparse_chunk_loss, s_hidden[:, sl], y[:, sl], t.ids[:, sl], t.logp[:, sl],
                                t.rest[:, sl], powers, student.lm_head.weight, self.alpha, self.T, self.kind, self.beta,
                                self.vocab, use_reentrant=False)
            ce_sum, kl_sum = ce_sum + ce, kl_sum + kl
        n = y.numel()
        ce_mean, kl_mean = ce_sum / n, kl_sum / n
        loss = self.alpha * self.T ** 2 * kl_mean + (1 - self.alpha) * ce_mean
        return loss, {"ce": float(ce_mean.detach()), "kl": float(kl_mean.detach())}


class HiddenProjection(nn.Module):
    """A learned linear map from the student's residual stream to the teacher's (no bias), one
    for all supervised layers: every layer of a transformer writes into the same residual basis,
    so one map serves them all and its size does not grow with depth.

    Initialised without data from the two token-embedding matrices, the one place where both
    residual streams are given for the same inputs: the identity when the student's embeddings
    are the teacher's (a layer copy), else the least-squares map ``W = argmin ||E_s W^T - E_t||``
    over the vocabulary. For a pruned student (``E_s = E_t[:, kept]``) that is the selection of
    the kept channels, with the dropped ones predicted from them; for a random student it is
    the best linear guess available. Trained with the student, discarded when it is saved.
    """

    def __init__(self, student_hidden: int, teacher_hidden: int):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(teacher_hidden, student_hidden))

    @classmethod
    def from_embeddings(cls, student_embed: torch.Tensor, teacher_embed: torch.Tensor,
                        chunk: int = 8192) -> "HiddenProjection":
        """The map initialised as the class says, on the student embeddings' device, in float32."""
        (v, ds), (vt, dt) = student_embed.shape, teacher_embed.shape
        if v != vt:
            raise UsageError(f"the student's vocabulary ({v}) is not the teacher's ({vt})")
        proj = cls(ds, dt).to(student_embed.device)
        with torch.no_grad():
            if ds == dt and torch.equal(student_embed, teacher_embed):
                proj.weight.copy_(torch.eye(dt))
                return proj
            # Normal equations, accumulated in chunks of the vocabulary: G = E_s^T E_s, C = E_s^T E_t,
            # W^T = (G + ridge I)^-1 C, the ridge tiny but enough for a vocabulary smaller than ds.
            gram = torch.zeros(ds, ds, dtype=torch.float64)
            cross = torch.zeros(ds, dt, dtype=torch.float64)
            for i in range(0, v, chunk):
                es = student_embed[i:i + chunk].float()
                et = teacher_embed[i:i + chunk].to(es.device).float()
                gram += (es.T @ es).double().cpu()
                cross += (es.T @ et).double().cpu()
            ridge = 1e-6 * float(gram.diagonal().mean()) + 1e-12
            w_t = torch.linalg.solve(gram + ridge * torch.eye(ds, dtype=torch.float64), cross)
            proj.weight.copy_(w_t.T.float())
        return proj

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)


def hidden_state_loss(student_states: list, teacher_states: list, projection: HiddenProjection) -> torch.Tensor:
    """Mean over pairs and positions of ``||P s - t||^2 / ||t||^2``: each position's squared error
    of the projected student state relative to the teacher state's square norm, so the term is 1
    for a prediction of zero whatever the model's scale, and no token with an outsized residual
    norm (an attention sink) outweighs the rest. Being a mean over positions, it is the same
    whether a batch is split into micro-batches or over processes. Teacher states are targets
    (no gradient); computed in float32."""
    if len(student_states) != len(teacher_states) or not student_states:
        raise ValueError(f"{len(student_states)} student and {len(teacher_states)} teacher states to pair")
    total = 0.0
    for s, t in zip(student_states, teacher_states):
        t = t.detach().float()
        err = (projection(s.float()) - t).pow(2).sum(-1)
        total = total + (err / t.pow(2).sum(-1).clamp_min(1e-12)).mean()
    return total / len(student_states)


class DistillLoss:
    """``loss_fn`` for the Trainer: mean over tokens of alpha*T^2*KL + (1-alpha)*CE, plus, with
    ``hidden_weight > 0``, ``hidden_weight`` times :func:`hidden_state_loss` over every student
    layer ``i`` paired with teacher layer ``keep[i]`` (all layers: a projection per step costs
    less than one layer's MLP, and every mapped layer gets a target). ``student`` and ``keep``
    are needed only then: the student's shape and embeddings initialise :attr:`projection`,
    a module the caller trains with the student (the Trainer's ``extra``) and never saves as part
    of it. With ``hidden_weight == 0`` there is no projection and nothing else is computed or captured."""

    def __init__(self, teacher, alpha: float, temperature: float, kind: str = "forward", beta: float = 0.5,
                 chunk: int = 128, hidden_weight: float = 0.0, student=None, keep: list[int] | None = None):
        self.teacher, self.alpha, self.T, self.kind, self.beta = teacher, alpha, temperature, kind, beta
        self.chunk = chunk
        self.hidden_weight = hidden_weight
        self.projection: HiddenProjection | None = None
        self.keep: list[int] = []
        if hidden_weight > 0:
            if teacher is None or student is None or keep is None:
                raise UsageError("the hidden-state loss (--hidden-weight > 0) needs a teacher")
            n_s, n_t = student.config.num_hidden_layers, teacher.config.num_hidden_layers
            if len(keep) != n_s or any(not 0 <= i < n_t for i in keep):
                raise UsageError(f"--hidden-weight pairs each of the student's {n_s} layers with a teacher layer "
                                 f"in 0..{n_t - 1}; --layer-ids gives {list(keep)}")
            self.keep = list(keep)
            self.projection = HiddenProjection.from_embeddings(student.model.embed_tokens.weight.detach(),
                                                               teacher.model.embed_tokens.weight.detach())

    def __call__(self, model, batch: torch.Tensor):
        from torch.utils.checkpoint import checkpoint

        x, y = batch[:, :-1], batch[:, 1:]
        hidden_on = self.projection is not None
        s_states: list | None = [] if hidden_on else None
        if hidden_on:  # through the DDP wrapper when distributed, like the plain call
            s_hidden = model(x, return_hidden=True, layers_out=s_states)
        else:
            s_hidden = model(x, return_hidden=True)  # (B, T, H)
        student = model.module if hasattr(model, "module") else model
        t_hidden, t_head, t_states = None, None, None
        if self.alpha > 0 or hidden_on:
            t_states = [] if hidden_on else None
            with torch.no_grad():
                if hidden_on:
                    t_hidden = self.teacher(x, return_hidden=True, layers_out=t_states)
                else:
                    t_hidden = self.teacher(x, return_hidden=True)
            t_head = self.teacher.lm_head.weight
        if self.alpha == 0:
            t_hidden, t_head = None, None
        ce_sum, kl_sum = 0.0, 0.0
        for i in range(0, x.shape[1], self.chunk):
            sl = slice(i, i + self.chunk)
            ce, kl = checkpoint(_chunk_loss, s_hidden[:, sl], None if t_hidden is None else t_hidden[:, sl], y[:, sl],
                                student.lm_head.weight, t_head, self.alpha, self.T, self.kind, self.beta,
                                use_reentrant=False)
            ce_sum, kl_sum = ce_sum + ce, kl_sum + kl
        n = y.numel()
        ce_mean, kl_mean = ce_sum / n, kl_sum / n
        loss = self.alpha * self.T ** 2 * kl_mean + (1 - self.alpha) * ce_mean
        logs = {"ce": float(ce_mean.detach()), "kl": float(kl_mean.detach())}
        if hidden_on:
            hid = hidden_state_loss(s_states, [t_states[j] for j in self.keep], self.projection)
            loss = loss + self.hidden_weight * hid
            logs["hidden"] = float(hid.detach())
        return loss, logs


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


def kto_loss(pi: torch.Tensor, ref: torch.Tensor, desirable: torch.Tensor, kl: torch.Tensor, beta: float,
             desirable_weight: float = 1.0, undesirable_weight: float = 1.0) -> tuple[torch.Tensor, dict]:
    """KTO (Ethayarajh et al. 2024) over single responses: mean of
    ``w_D (1 - sigmoid(beta (r - z0)))`` for desirable ones and ``w_U (1 - sigmoid(beta (z0 - r)))``
    for undesirable ones, with ``r = log pi(y|x) - log ref(y|x)`` and the reference point
    ``z0 = max(0, kl)``, held constant (``kl``: the batch's mean ``log pi - log ref`` over
    mismatched prompt/completion pairs, as the paper and TRL estimate it)."""
    r = pi - ref
    z0 = kl.detach().clamp(min=0)
    good = desirable.bool()
    losses = torch.where(good, desirable_weight * (1 - torch.sigmoid(beta * (r - z0))),
                         undesirable_weight * (1 - torch.sigmoid(beta * (z0 - r))))
    return losses.mean(), {"rewards": beta * r.detach(), "desirable": good, "z0": z0}


def reward_accuracy(margins: torch.Tensor) -> float:
    """Share of pairs whose chosen reward beats the rejected one; a tie counts as half."""
    return ((margins > 0).float() + 0.5 * (margins == 0).float()).mean().item()
