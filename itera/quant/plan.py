"""``--method auto``: per-layer bit widths chosen from measured sensitivity under a size budget.

For every layer and candidate width the layer alone is quantized (round-to-nearest) and the KL
divergence of the model's next-token distribution from the float model's is measured on
calibration text; a multiple-choice knapsack then picks the widths that minimise the summed KL
with the bytes written under the budget.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from itera.errors import UsageError
from itera.losses import kl_div
from itera.quant.formats import LayerQuant, dequantize, rtn


@torch.no_grad()
def sensitivities(model, mods: dict, calib: torch.Tensor, options: dict[str, dict[int, LayerQuant]],
                  progress=None) -> dict[str, dict[int, float]]:
    """KL(float || model with only this layer quantized at b bits, RTN), mean per calibration token,
    for every layer and each of its ``options`` (bits -> how the layer is quantized at that width)."""
    ref = F.log_softmax(model(calib).float(), -1)  # (B, T, V)
    out: dict[str, dict[int, float]] = {}
    for k, (name, m) in enumerate(mods.items()):
        w = m.weight.data.clone()
        out[name] = {}
        for b, q in options[name].items():
            codes, scales, zeros = rtn(w, q)
            m.weight.data = dequantize(codes, scales, zeros).to(w.dtype)
            logp = F.log_softmax(model(calib).float(), -1)
            out[name][b] = kl_div(ref, logp).mean().item()
        m.weight.data = w
        if progress:
            progress(k + 1)
    return out


def choose_plan(costs: dict[str, dict[int, int]], losses: dict[str, dict[int, float]], budget_bytes: int,
                units: int = 4000) -> dict[str, int]:
    """Bits per layer minimising the summed measured loss with total bytes <= budget.

    A multiple-choice knapsack solved by dynamic programming over the budget cut into ``units``
    steps; each option's bytes are rounded *up* to whole steps, so the plan never exceeds the budget.
    """
    names = list(costs)
    step = max(1, math.ceil(budget_bytes / units))
    cap = budget_bytes // step
    INF = float("inf")
    best = [0.0] + [INF] * cap  # best[c]: least loss of the layers so far using exactly c steps
    choice: list[list[int | None]] = []
    for name in names:
        new = [INF] * (cap + 1)
        pick: list[int | None] = [None] * (cap + 1)
        for b, nbytes in costs[name].items():
            c = math.ceil(nbytes / step)
            loss = losses[name][b]
            for used in range(cap - c + 1):
                if best[used] + loss < new[used + c]:
                    new[used + c] = best[used] + loss
                    pick[used + c] = b
        best = new
        choice.append(pick)
    end = min(range(cap + 1), key=lambda c: best[c])
    if best[end] == INF:
        raise UsageError("no plan fits the --target-bpw budget")
    plan: dict[str, int] = {}
    for name, pick in zip(reversed(names), reversed(choice)):
        b = pick[end]
        plan[name] = b
        end -= math.ceil(costs[name][b] / step)
    return dict(reversed(list(plan.items())))
