"""torch.export (``.pt2``) and TorchScript (``.pt``) exports of the logits graph, for PyTorch
deployments; each is loaded back with its own loader and compared with the source model.

:func:`write_pt2`/:func:`verify_pt2` and :func:`write_torchscript`/:func:`verify_torchscript`
are these formats' entries in :data:`itera.export.formats.FORMATS`.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch

from itera.export.trace import LogitsOnly

def write_pt2(src, opts, staging, reporter) -> dict:
    x = torch.tensor([src.ids])
    seq_dim = torch.export.Dim("seq", min=2, max=src.cfg.max_position_embeddings)
    with torch.no_grad():
        ep = torch.export.export(LogitsOnly(src.model).eval(), (x,), dynamic_shapes={"input_ids": {1: seq_dim}})
    torch.export.save(ep, str(staging.main))
    return {}


def verify_pt2(src, opts, artifact: Path, info: dict):
    """The loaded program's logits; the file holds the source's weights, so they are the reference."""
    with torch.no_grad():
        return torch.export.load(str(artifact)).module()(torch.tensor([src.ids]))[0].numpy(), src.ref, {}, []


def write_torchscript(src, opts, staging, reporter) -> dict:
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # the tracer's notices about Python control flow
        torch.jit.trace(LogitsOnly(src.model).eval(), torch.tensor([src.ids])).save(str(staging.main))
    return {}


def verify_torchscript(src, opts, artifact: Path, info: dict):
    """The loaded module's logits against the source's (the file holds its weights)."""
    with torch.no_grad():
        return torch.jit.load(str(artifact))(torch.tensor([src.ids]))[0].numpy(), src.ref, {}, []
