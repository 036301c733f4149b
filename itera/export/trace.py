"""What every traced export shares (ONNX, torch.export, TorchScript): the logits-only graph it
traces, and what such a graph cannot express."""

from __future__ import annotations

import torch

from itera.errors import UnsupportedModelError


class LogitsOnly(torch.nn.Module):
    """``input_ids`` (batch, seq) -> ``logits`` (batch, seq, vocab): the graph every export traces."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids):
        return self.model(input_ids)


def check_traceable(cfg, opts) -> None:
    if cfg.sliding_window is not None and cfg.sliding_window < cfg.max_position_embeddings:
        raise UnsupportedModelError(f"{opts.format} export of a sliding-window model ({cfg.model_type}, window "
                                    f"{cfg.sliding_window}) is not supported: the traced graph has no window mask; "
                                    "evaluate and serve it from the checkpoint (torch runtime)")
