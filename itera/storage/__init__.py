"""The storage-format layer, below quantization (:mod:`itera.quant`) and export
(:mod:`itera.export`), which both build on it and never on each other:

- :mod:`itera.storage.types` — :class:`~itera.storage.types.StorageType`, what every entry of a
  quantization plan is (F16 included), and :func:`by_name`;
- :mod:`itera.storage.ggml` — GGML's block types and their encoders;
- :mod:`itera.storage.layout` — itera's own quantized checkpoint layout;
- :mod:`itera.storage.names` — the GGUF names and row order of a Llama checkpoint's tensors.
"""

from __future__ import annotations

from itera.storage.types import StorageType


def by_name(name: str) -> StorageType:
    """A float or GGML type by its GGUF name (``F16``, ``Q4_K``); KeyError when there is none."""
    from itera.storage.ggml import TYPES
    from itera.storage.types import FLOATS

    return FLOATS[name] if name in FLOATS else TYPES[name]
