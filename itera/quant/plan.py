"""``--method auto``: a storage type per tensor, chosen from measured sensitivity under a size budget.

For every tensor and candidate type the tensor alone is quantized (round-to-nearest with the
type's importance-weighted parameter search) and the KL divergence of the model's next-token
distribution from the float model's is measured on calibration text; a multiple-choice knapsack
then picks the types that minimise the summed KL with the bytes under the budget.

The measurement is of what llama.cpp will compute: a matrix product's input is rounded as
llama.cpp's CPU backend rounds it for that weight's type (8-bit blocks of 256 for K-quants, of 32
for Q4_0/Q5_0/Q8_0, float16 for F16). On a model whose activations have outlier channels that
rounding, not the weights, can be most of a K-quant's loss (hidden 512: Q5_K weights alone +0.002
perplexity, +0.13 with their inputs rounded), and a type with finer input blocks is the better buy.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from itera.errors import UsageError
from itera.losses import kl_div


class _Runner:
    """The model's log-probabilities on fixed calibration tokens, recomputed only from the first
    layer a change can affect: the float model's input to every decoder layer is cached."""

    def __init__(self, model, calib: torch.Tensor):
        self.model, self.calib = model, calib
        inner = model.model
        self.cos, self.sin = model.rotary(torch.arange(calib.shape[1], device=calib.device), torch.float32)
        self.mask = model._mask(calib.shape[1], 0, calib.device, None)  # None: plain causal
        self.inputs = [inner.embed_tokens(calib).float()]
        for layer in inner.layers:
            self.inputs.append(layer(self.inputs[-1], self.cos, self.sin, self.mask, None))

    def logp(self, start: int | None) -> torch.Tensor:
        """From decoder layer ``start`` on (None: the whole model, the embeddings changed)."""
        if start is None:
            return F.log_softmax(self.model(self.calib).float(), -1)
        x = self.inputs[start]
        for layer in self.model.model.layers[start:]:
            x = layer(x, self.cos, self.sin, self.mask, None)
        return F.log_softmax(self.model.lm_head(self.model.model.norm(x)).float(), -1)


def _first_layer(name: str, n_layers: int) -> int | None:
    if name.startswith("model.layers."):
        return int(name.split(".")[2])
    return n_layers if name == "lm_head" else None


@torch.no_grad()
def sensitivities(model, mods: dict, calib: torch.Tensor, options: dict[str, dict], importance: dict | None = None,
                  progress=None) -> dict[str, dict]:
    """KL(float || model with only this tensor quantized one way), mean per calibration token, for
    every tensor and each of its ``options`` (key -> a :class:`~itera.storage.types.StorageType`,
    or any scheme with ``quantize``/``expand``)."""
    from itera.storage.ggml import round_inputs_as_llama_cpp

    run = _Runner(model, calib)
    ref = run.logp(len(model.model.layers))
    out: dict[str, dict] = {}
    for k, (name, m) in enumerate(mods.items()):
        start = _first_layer(name, len(model.model.layers))
        w = m.weight.data.clone()
        imp = (importance or {}).get(name)
        out[name] = {}
        # an embedding is a row lookup (no product), unless tied: then the output product reads it
        product = m if isinstance(m, torch.nn.Linear) else (
            model.lm_head if model.lm_head.weight is m.weight else None)
        try:
            for key, q in options[name].items():
                m.weight.data = q.expand(*q.quantize(w.float(), imp)).to(w.dtype)
                hook = round_inputs_as_llama_cpp(product, key) if product is not None else None
                try:
                    out[name][key] = max(kl_div(ref, run.logp(start)).mean().item(), 0.0)
                finally:
                    if hook is not None:
                        hook.remove()
        finally:
            m.weight.data = w
        if progress:
            progress(k + 1)
    return out


@torch.no_grad()
def predicted_sensitivities(model, mods: dict, stats, options: dict[str, dict], importance: dict | None = None,
                            progress=None) -> dict[str, dict]:
    """What :func:`sensitivities` measures, predicted from one calibration pass's statistics
    (:func:`itera.quant.fisher.fisher_stats` with :func:`~itera.quant.fisher.probes_for`'s probes):
    each tensor is quantized once per option, and no forward pass is run."""
    from itera.quant.fisher import predicted_kls

    tied = model.lm_head.weight is model.model.embed_tokens.weight
    out: dict[str, dict] = {}
    for k, (name, m) in enumerate(mods.items()):
        w = m.weight.data.float()
        imp = (importance or {}).get(name)
        lookup = name == "model.embed_tokens"
        product = name if isinstance(m, torch.nn.Linear) else ("lm_head" if lookup and tied else None)
        out[name] = predicted_kls(name, w, options[name], imp, stats, product, lookup)
        if progress:
            progress(k + 1)
    return out


def choose_plan(costs: dict[str, dict], losses: dict[str, dict], budget_bytes: int, units: int = 50000) -> dict:
    """The option per tensor minimising the summed measured loss with total bytes <= budget.

    A multiple-choice knapsack solved by dynamic programming over the budget cut into ``units``
    steps; each option's bytes are rounded *up* to whole steps, so the plan never exceeds the budget.
    """
    names = list(costs)
    step = max(1, -(-budget_bytes // units))
    cap = budget_bytes // step
    best = np.full(cap + 1, np.inf)
    best[0] = 0.0  # best[c]: least loss of the tensors so far using exactly c steps
    picks = []
    for name in names:
        keys = list(costs[name])
        new = np.full(cap + 1, np.inf)
        pick = np.full(cap + 1, -1)
        for j, key in enumerate(keys):
            c = -(-costs[name][key] // step)
            if c > cap:
                continue
            cand = np.full(cap + 1, np.inf)
            cand[c:] = best[:cap + 1 - c] + losses[name][key]
            better = cand < new
            new[better], pick[better] = cand[better], j
        best = new
        picks.append((keys, pick))
    if not np.isfinite(best).any():
        raise UsageError("no plan fits the budget")
    end = int(np.argmin(best))
    plan = {}
    for name, (keys, pick) in zip(reversed(names), reversed(picks)):
        key = keys[pick[end]]
        plan[name] = key
        end -= -(-costs[name][key] // step)
    return dict(reversed(list(plan.items())))
