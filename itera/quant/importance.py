"""Importance data: how much each input column of each matrix matters, from calibration text.

For every linear layer (and the output head) the mean over calibration tokens of the square of
each input, ``mean(x_j^2)``: the diagonal of GPTQ's Hessian ``X^T X / n``, and what llama.cpp's
``llama-imatrix`` collects (its ``.imatrix`` holds the same per-column mean squares, keyed by
GGUF tensor name). llama.cpp's quantizer weighs each weight's squared error by it when choosing a
block's scale; itera's own GGML writer (:mod:`itera.storage.ggml`) does the same.
"""

from __future__ import annotations

import numpy as np
import torch


@torch.no_grad()
def input_mean_squares(model, calib: torch.Tensor, chunk: int = 8) -> dict[str, torch.Tensor]:
    """Hugging Face module name -> (in_features,) float32 mean square of that module's inputs over
    every token of ``calib`` (samples, seqlen), for every ``nn.Linear`` of ``model`` (the tied
    output head is ``lm_head``, as in the model)."""
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    hooks = []

    def hook_for(name):
        def hook(_m, inp):
            a = inp[0].detach().float().flatten(0, -2)
            sums[name] = sums.get(name, 0) + (a * a).sum(0)
            counts[name] = counts.get(name, 0) + a.shape[0]
        return hook

    for name, m in model.named_modules():
        if isinstance(m, torch.nn.Linear):
            hooks.append(m.register_forward_pre_hook(hook_for(name)))
    try:
        for i in range(0, calib.shape[0], chunk):
            model(calib[i:i + chunk])
    finally:
        for h in hooks:
            h.remove()
    return {n: (sums[n] / counts[n]).cpu() for n in sums}


def gguf_importance(importance: dict[str, torch.Tensor], cfg) -> dict[str, np.ndarray]:
    """The same data keyed by GGUF tensor name, as llama.cpp's quantizer looks it up: the output
    head is ``output.weight``, or ``token_embd.weight`` when the embeddings are tied (llama.cpp
    then multiplies by the embedding matrix)."""
    from itera.storage.names import gguf_name

    out = {}
    for module, v in importance.items():
        if module == "lm_head":
            name = "token_embd.weight" if cfg.tie_word_embeddings else "output.weight"
        else:
            name = gguf_name(module + ".weight")
        out[name] = np.ascontiguousarray(v.numpy(), dtype=np.float32)
    return out
