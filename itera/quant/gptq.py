"""GPTQ (Frantar et al. 2022, "GPTQ: Accurate Post-Training Quantization for Generative
Pre-trained Transformers"): quantize a weight matrix column by column, pushing each column's
rounding error onto the columns not yet quantized through the inverse Hessian of the layer's
reconstruction loss ``||X W^T - X Q^T||^2`` (``H = X^T X / n``).

Group parameters follow the shared rule of :mod:`itera.storage.layout`; with groups they are
computed from the error-updated weights when a group starts (all of a group lies in one block).
With activation ordering (columns processed by decreasing Hessian diagonal) they are computed
up front from the original weights ("static groups"), so groups stay contiguous on disk.
"""

from __future__ import annotations

import torch

from itera.errors import IteraError

INNER = 32  # columns whose errors are pushed column by column before the rest of the block hears of them


def gptq(w: torch.Tensor, h: torch.Tensor, q, damp: float = 0.01, act_order: bool = False,
         block: int = 128) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(codes, a, b) for ``w`` (out, in) given the Hessian ``h`` (in, in).

    ``q`` is the scheme: itera's :class:`~itera.storage.layout.LayerQuant` (``a, b`` are scales and
    zero points) or a GGML :class:`~itera.storage.ggml.GGMLType` (``w = a * grid[q] + b`` per sub-block). It
    gives ``params`` of a group, ``codes`` and ``dequant``; the algorithm is the same for all."""
    W = w.detach().float().clone()
    H = h.detach().float().clone()
    out, n = W.shape
    gw = q.group_width(n)
    sub = getattr(q, "sub", gw)  # columns sharing one (a, b); a GGML K type has several per block
    grouped = q.group_size is not None
    dead = torch.diag(H) == 0  # inputs that never fire: weights there do not matter
    H[dead, dead] = 1
    W[:, dead] = 0
    importance = torch.diag(H)  # the mean square of each input: how much its column's error costs
    static = (not grouped) or act_order
    if static:  # per-channel, or act-order: parameters from the weights as they are
        scales, zeros = q.params(W, importance)
    else:
        scales = torch.zeros(out, n // sub, device=W.device)
        zeros = torch.zeros(out, n // sub, device=W.device)
    perm = torch.argsort(torch.diag(H), descending=True) if act_order else torch.arange(n, device=W.device)
    W, H = W[:, perm], H[perm][:, perm]
    H += damp * torch.mean(torch.diag(H)) * torch.eye(n, device=W.device)
    try:
        L = torch.linalg.cholesky(H)
        Hinv = torch.linalg.cholesky(torch.cholesky_inverse(L), upper=True)
    except RuntimeError:
        raise IteraError("GPTQ's Hessian is not positive definite even after dampening; "
                         "pass a larger --damp or more --calib-samples") from None
    if grouped and not act_order:
        block = max(block // gw, 1) * gw  # every group inside one block
    codes = torch.zeros(out, n, device=W.device)
    for i1 in range(0, n, block):
        i2 = min(i1 + block, n)
        W1 = W[:, i1:i2].clone()
        Err = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        # Inside a block, columns a piece at a time too: each column's error reaches the rest of its
        # piece at once, the rest of the block when the piece ends (one product instead of a rank-1
        # update of the whole block per column: the same arithmetic, a fraction of the memory
        # traffic). A group's parameters need every earlier column's error, so groups start pieces.
        starts = set(range(0, i2 - i1, INNER))
        if not static:
            starts |= {i for i in range(i2 - i1) if (i1 + i) % gw == 0}
        cuts = sorted(starts) + [i2 - i1]
        for j1, j2 in zip(cuts, cuts[1:]):
            for i in range(j1, j2):
                col = int(perm[i1 + i])
                g = col // sub
                if not static and col % gw == 0:
                    s, z = q.params(W1[:, i:i + gw], importance[col:col + gw])  # from the error-updated weights
                    scales[:, g:g + gw // sub], zeros[:, g:g + gw // sub] = s, z
                c = q.codes(W1[:, i:i + 1], scales[:, g:g + 1], zeros[:, g:g + 1])[:, 0]
                codes[:, col] = c
                deq = q.dequant(c, scales[:, g], zeros[:, g])
                err = (W1[:, i] - deq) / Hinv1[i, i]
                W1[:, i:j2].addr_(err, Hinv1[i, i:j2], alpha=-1)
                Err[:, i] = err
            W1[:, j2:].addmm_(Err[:, j1:j2], Hinv1[j1:j2, j2:], alpha=-1)
        W[:, i2:] -= Err @ Hinv[i1:i2, i2:]
    return codes, scales, zeros
