"""How a Llama-architecture checkpoint's tensors are named and laid out inside a GGUF file.

Names come from gguf-py's own tensor-name map (``gguf.get_tensor_name_map``), the table llama.cpp's
converter uses, so a tensor is called what llama.cpp looks for. The q and k projections are stored
with their rows reordered (:func:`rope_permutation`): Hugging Face's rotate-half rotary layout
becomes llama.cpp's interleaved one.
"""

from __future__ import annotations

import functools

import torch

_BLOCKS = 64  # the name map is built for this many decoder layers at a time


@functools.lru_cache(maxsize=4)
def _name_map(n_blocks: int):
    import gguf

    return gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, n_blocks)


def gguf_name(hf: str) -> str:
    """Hugging Face tensor name -> llama.cpp's (``model.layers.3.mlp.down_proj.weight`` ->
    ``blk.3.ffn_down.weight``)."""
    parts = hf.split(".")
    layer = int(parts[2]) if parts[:2] == ["model", "layers"] and parts[2].isdigit() else 0
    name = _name_map(-(-(layer + 1) // _BLOCKS) * _BLOCKS).get_name(hf, try_suffixes=(".weight", ".bias"))
    if name is None:
        raise KeyError(f"no GGUF name for the Llama tensor {hf}")
    return name


def rope_permutation(n_head: int, head_dim: int) -> torch.Tensor:
    """Row order that turns rotate-half q/k projections into llama.cpp's interleaved layout."""
    rows = torch.arange(n_head * head_dim)
    return rows.reshape(n_head, 2, head_dim // 2).transpose(1, 2).reshape(-1)
