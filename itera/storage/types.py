"""How one weight matrix is stored: the one type every quantization plan entry is.

Three kinds, one interface (:class:`StorageType`):

- ``float``: :data:`F16` (and F32, BF16 for GGUF files) — the matrix as it is, rounded;
- ``itera``: :class:`itera.storage.layout.LayerQuant` — itera's grouped integer layout
  (``qweight``/``scales``/``zeros`` tensors);
- ``ggml``: :class:`itera.storage.ggml.GGMLType` — llama.cpp's block types (Q4_0 ... Q6_K, IQ4_XS),
  kept in an itera checkpoint as the blocks themselves.

Every kind answers the same questions: what it is called (:meth:`label`), whether a matrix with
``cols`` input columns fits it, how many bytes a (rows, cols) matrix takes, which GGUF type holds
its data as it is (:attr:`gguf_type`, None when writing GGUF must re-quantize), how it describes
itself in a record (:meth:`describe`), and how to round a matrix through it
(``expand(*quantize(w))``). Nothing here imports the quantizers or the exporters: they import this.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

KINDS = ("float", "itera", "ggml")


class StorageType(ABC):
    """The storage of one matrix. Subclasses are frozen dataclasses: equal when they store alike."""

    kind: str = ""

    @abstractmethod
    def label(self) -> str:
        """The name people read: ``F16``, ``Q4_K``, ``4-bit group 128 sym``."""

    @abstractmethod
    def fits(self, cols: int) -> bool:
        """Whether a matrix with ``cols`` input columns can be stored this way."""

    @abstractmethod
    def tensor_bytes(self, rows: int, cols: int) -> int:
        """Bytes of a (rows, cols) matrix's data stored this way."""

    @property
    @abstractmethod
    def gguf_type(self) -> str | None:
        """The GGUF tensor type whose data this storage holds exactly, or None."""

    @abstractmethod
    def describe(self) -> dict:
        """What a record says about a matrix stored this way."""

    @property
    def quantized(self) -> bool:
        return self.kind != "float"


@dataclass(frozen=True)
class FloatType(StorageType):
    """A float matrix: F16 (what quantize leaves unquantized), F32 or BF16."""

    name: str
    bits: int
    kind = "float"

    def label(self) -> str:
        return self.name

    def fits(self, cols: int) -> bool:
        return True

    def tensor_bytes(self, rows: int, cols: int) -> int:
        return rows * cols * self.bits // 8

    @property
    def gguf_type(self) -> str:
        return self.name

    def bits_per_weight(self) -> float:
        return float(self.bits)

    def describe(self) -> dict:
        return {"type": self.name, "bits_per_weight": self.bits_per_weight()}

    # the same two calls as a quantized type's, so a plan's entries are used alike

    def quantize(self, w, importance=None) -> tuple:
        import torch

        dtype = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32}[self.name]
        return (w.to(dtype),)

    def expand(self, rounded):
        return rounded.float()


F16 = FloatType("F16", 16)
F32 = FloatType("F32", 32)
BF16 = FloatType("BF16", 16)
FLOATS = {t.name: t for t in (F16, F32, BF16)}
