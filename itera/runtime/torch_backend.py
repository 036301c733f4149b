"""The torch backend: itera's own Llama implementation on CPU or CUDA."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from itera.model.checkpoint import load_config, load_model
from itera.runtime.base import RuntimeBase, Stepper
from itera.tokenizer import Tokenizer


class TorchRuntime(RuntimeBase):
    name = "torch"

    def __init__(self, model, tokenizer: Tokenizer, device: str):
        self.model, self.tokenizer, self.device = model, tokenizer, device
        self.max_context = model.config.max_position_embeddings

    @classmethod
    def load(cls, path: Path, dtype: str = "float32", device: str = "cpu", threads: int | None = None) -> "TorchRuntime":
        if threads:
            torch.set_num_threads(threads)
        tokenizer = Tokenizer.from_dir(path)
        tokenizer.check_fits(load_config(path).vocab_size, str(path))
        model, _ = load_model(path, dtype=dtype, device=device)
        return cls(model, tokenizer, device)

    @torch.inference_mode()
    def logits(self, ids: Sequence[int]):
        x = torch.tensor([list(ids)], dtype=torch.long, device=self.device)
        return self.model(x)[0].float().cpu().numpy()

    @torch.inference_mode()
    def nll(self, ids: Sequence[int], n_score: int) -> list[float]:
        x = torch.tensor([list(ids)], dtype=torch.long, device=self.device)  # (1, T)
        logits = self.model(x[:, :-1])[0, -n_score:].float()  # (n_score, V): predictions for the last n_score tokens
        targets = x[0, -n_score:]
        return torch.nn.functional.cross_entropy(logits, targets, reduction="none").tolist()

    def stepper(self) -> "TorchStepper":
        return TorchStepper(self)


class TorchStepper(Stepper):
    """One sequence on a :class:`TorchRuntime`: its own KV cache, the runtime's weights (several
    steppers may run at once on one model: inference does not change it)."""

    def __init__(self, rt: TorchRuntime):
        self.rt = rt

    def _logits(self, ids: list[int]) -> np.ndarray:
        with torch.inference_mode():
            x = torch.tensor([ids], device=self.rt.device)
            return self.rt.model(x, cache=self.cache)[0, -1].float().cpu().numpy()  # (vocab,)

    def prefill_logits(self, ids):
        from itera.model.llama import KVCache

        self.cache = KVCache()
        return self._logits(list(ids))

    def step_logits(self, token):
        return self._logits([token])
