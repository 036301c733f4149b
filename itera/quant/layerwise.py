"""Quantizing a model layer by layer: each decoder layer's Hessians come from calibration
activations that already went through the quantized layers before it, so memory stays near
one layer's activations (GPTQ's sequential scheme)."""

from __future__ import annotations

import math

import torch

from itera.memory import release_free_memory
from itera.storage.layout import EMBEDDINGS
from itera.quant.gptq import gptq
from itera.storage.types import StorageType


@torch.no_grad()
def layer_inputs_hessians(layer, x: torch.Tensor, cos, sin, names: dict[str, torch.nn.Module], chunk: int = 8):
    """Run one decoder layer over the calibration hidden states; return H = X^T X / n per linear.
    Linears that read the same input (q, k and v; gate and up) share one Hessian."""
    hs: dict[str, torch.Tensor] = {}
    counts = {n: 0 for n in names}
    owner: dict[tuple, tuple] = {}  # an input of this chunk -> (the first linear that read it, the input)
    shared: dict[str, str] = {}
    hooks = []

    def hook_for(n):
        def hook(_m, inp):
            key = (inp[0].data_ptr(), tuple(inp[0].shape))
            first, _ = owner.setdefault(key, (n, inp[0]))  # held: its memory is not reused in this chunk
            if first != n:
                shared[n] = first
                return
            a = inp[0].float().flatten(0, -2)  # (tokens, in)
            hs[n] = hs[n].addmm_(a.T, a) if n in hs else a.T @ a
            counts[n] += a.shape[0]
        return hook

    for n, m in names.items():
        hooks.append(m.register_forward_pre_hook(hook_for(n)))
    try:
        for i in range(0, x.shape[0], chunk):
            owner.clear()
            layer(x[i:i + chunk], cos, sin, None, None)
    finally:
        for h in hooks:
            h.remove()
    out = {n: hs[n] / max(counts[n], 1) for n in hs}
    return {n: out[shared.get(n, n)] for n in names}


def _errors(w: torch.Tensor, w_hat: torch.Tensor, h: torch.Tensor | None) -> dict:
    """Relative weight error ||W - Q|| / ||W||; relative output error on calibration inputs,
    sqrt(tr(dW H dW^T) / tr(W H W^T)) = ||X dW^T|| / ||X W^T|| (None without a Hessian)."""
    dw = (w - w_hat).float()
    out = {"weight_error": (dw.norm() / w.float().norm()).item()}
    if h is not None:
        num, den = _quadratic(dw, h), _quadratic(w.float(), h)
        out["output_error"] = math.sqrt(max(num, 0.0) / den) if den > 0 else None
    return out


def _quadratic(m: torch.Tensor, h: torch.Tensor, rows: int = 4096) -> float:
    """tr(M H M^T), ``rows`` rows of M at a time (an output head's M H alone would be its size again)."""
    return sum(float(((m[r:r + rows] @ h) * m[r:r + rows]).sum()) for r in range(0, m.shape[0], rows))


def _figures(q: StorageType, w: torch.Tensor, w_hat: torch.Tensor, h: torch.Tensor | None) -> dict:
    return {**q.describe(), **_errors(w, w_hat, h)}


@torch.no_grad()
def quantize_model(model, mods: dict, plan: dict, method: str, calib: torch.Tensor | None, damp: float,
                   act_order: bool, progress=None, importance: dict | None = None) -> tuple[dict, dict]:
    """Quantize ``model`` in place (weights replaced by their dequantized values), layer by layer.

    ``plan``: module -> its :class:`~itera.storage.types.StorageType` (itera's layout, a GGML type, or F16). Returns (tensors to write
    for the quantized modules, per-module figures). With calibration data each decoder layer sees
    the outputs of the already-quantized layers before it, and with GPTQ the output head (the tied
    embedding matrix when there is no separate head) is quantized against the final hidden states.
    """
    tensors, figures = {}, {}
    importance = importance or {}

    def apply(name: str, module, h: torch.Tensor | None):
        q = plan[name]
        w = module.weight.data
        if not q.quantized:
            w_hat = q.expand(*q.quantize(w))
        else:
            if method == "gptq" and h is not None:
                codes, a, b = gptq(w, h, q, damp=damp, act_order=act_order)
            else:
                imp = importance.get(name)
                codes, a, b = q.quantize(w.float(), None if imp is None else imp.to(w.device))
            w_hat = q.expand(codes, a, b)
            tensors.update(q.tensors(name, codes.cpu(), a.cpu(), b.cpu()))
        figures[name] = _figures(q, w, w_hat, h)
        module.weight.data = w_hat.to(w.dtype)

    layers = model.model.layers
    head = "lm_head" if "lm_head" in mods else ("model.embed_tokens" if model.config.tie_word_embeddings
                                                 and "model.embed_tokens" in mods else None)
    if calib is not None:
        x = model.model.embed_tokens(calib).float()
        cos, sin = model.rotary(torch.arange(calib.shape[1], device=x.device), x.dtype)
        for i, layer in enumerate(layers):
            names = {n: m for n, m in mods.items() if n.startswith(f"model.layers.{i}.")}
            hs = layer_inputs_hessians(layer, x, cos, sin, names)
            for n, m in names.items():
                apply(n, m, hs[n])
            x = torch.cat([layer(x[j:j + 8], cos, sin, None, None) for j in range(0, x.shape[0], 8)])
            release_free_memory()  # the replaced weights' memory: see itera.memory
            if progress:
                progress(i + 1)
        if head is not None and method == "gptq":
            a = model.model.norm(x).flatten(0, -2)
            apply(head, mods[head], a.T @ a / a.shape[0])
    else:
        for i in range(len(layers)):
            for n, m in mods.items():
                if n.startswith(f"model.layers.{i}."):
                    apply(n, m, None)
            release_free_memory()
            if progress:
                progress(i + 1)
    for n in EMBEDDINGS:  # the rest: round-to-nearest (an embedding's "inputs" are token ids)
        if n in mods and n not in figures:
            apply(n, mods[n], None)
    return tensors, figures
