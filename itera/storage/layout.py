"""The quantized checkpoint layout.

A quantized checkpoint has the float checkpoint's directory shape. For every quantized linear
layer ``<module>`` (e.g. ``model.layers.0.mlp.down_proj``) ``model.safetensors`` holds, instead
of ``<module>.weight`` (out, in):

- ``<module>.qweight`` uint8 (out, in * bits / 8): the unsigned codes ``u`` in ``[0, 2^bits)``,
  bit-packed along each row, least significant bits first (for 4 bits: code ``2j`` in the low
  nibble of byte ``j``, code ``2j+1`` in the high nibble);
- ``<module>.scales`` float16 (out, in / group_size): one scale ``d`` per group of
  ``group_size`` consecutive input columns (one group per row when per-channel);
- ``<module>.zeros`` uint8 (out, in / group_size), asymmetric only: the zero point ``z``.

and the weight is ``w = d * (u - z)`` with ``z = 2^(bits-1)`` when symmetric. Symmetric scales
follow ggml's Q4_0/Q8_0 rule ``d = m / -2^(bits-1)`` (``m`` the group's value of largest
magnitude, sign kept), and codes are computed from the float16-rounded scale, so a symmetric
group-32 layer carries exactly what GGUF's Q4_0 (4-bit) and Q8_0 (8-bit) blocks store: a
float16 ``d`` per 32 weights and codes with ``w = d * (u - 8)`` / ``w = d * (u - 128)``.

``config.json`` gains ``quantization_config``::

    {"quant_method": "itera", "format_version": 1, "method": "gptq", "bits": 4,
     "group_size": 128, "sym": true, "quantize_embeddings": false,
     "layers": {"model.layers.0.self_attn.q_proj": {"bits": 4, "group_size": 128, "sym": true}, ...}}

Tensors that are not quantized (embeddings and output head by default, norms, biases) are
stored in float16.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

import torch

from itera.storage.types import StorageType

if TYPE_CHECKING:
    import numpy as np

QUANT_METHOD = "itera"
FORMAT_VERSION = 1
SUPPORTED_BITS = (2, 3, 4, 8)
LINEAR_SUFFIXES = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                   "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
EMBEDDINGS = ("model.embed_tokens", "lm_head")


@dataclass(frozen=True)
class LayerQuant(StorageType):
    """How one layer is quantized. ``group_size`` None means one group per output row."""

    bits: int
    group_size: int | None
    sym: bool
    kind = "itera"

    @property
    def gguf_type(self) -> str | None:
        """Symmetric group-32 4- and 8-bit layers carry exactly GGUF's Q4_0 and Q8_0 blocks."""
        return {4: "Q4_0", 8: "Q8_0"}.get(self.bits) if self.sym and self.group_size == GGML_BLOCK else None

    def describe(self) -> dict:
        return {"bits": self.bits, "group_size": self.group_size, "sym": self.sym}

    def tensor_bytes(self, rows: int, cols: int) -> int:
        return self.stored_bytes(rows, cols)

    def groups(self, in_features: int) -> int:
        return 1 if self.group_size is None else in_features // self.group_size

    def group_width(self, in_features: int) -> int:
        return in_features if self.group_size is None else self.group_size

    def stored_bytes(self, out_features: int, in_features: int) -> int:
        """Bytes of qweight + scales (+ zeros) this layer takes on disk."""
        g = self.groups(in_features)
        return out_features * (in_features * self.bits // 8 + 2 * g + (0 if self.sym else g))

    def as_dict(self) -> dict:
        return asdict(self)

    # what a checkpoint stores for a layer quantized this way (the same methods as a GGMLType's)

    def fits(self, in_features: int) -> bool:
        return in_features % self.group_width(in_features) == 0 and (in_features * self.bits) % 8 == 0

    def shapes(self, prefix: str, out_features: int, in_features: int) -> dict[str, tuple[tuple, str]]:
        return expected_shapes(prefix, self, out_features, in_features)

    def tensors(self, prefix: str, codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor) -> dict:
        return to_tensors(prefix, codes, scales, zeros, self)

    def weight(self, prefix: str, tensors: dict, out_features: int, in_features: int) -> torch.Tensor:
        return from_tensors(prefix, tensors, self, in_features)

    def quantize(self, w: torch.Tensor, importance: torch.Tensor | None = None):
        return rtn(w, self)

    def expand(self, codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor) -> torch.Tensor:
        return dequantize(codes, scales, zeros)

    def label(self) -> str:
        return f"{self.bits}-bit " + (f"group {self.group_size}" if self.group_size else "per-channel") + \
            (" sym" if self.sym else " asym")

    # the GPTQ scheme (itera.quant.gptq): scales d and zero points z, w = d * (u - z)

    def params(self, w: torch.Tensor, importance: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        return group_params(w, self)  # ggml's rule; no search

    def codes(self, w: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor) -> torch.Tensor:
        return quantize_codes(w, scales, zeros, self)

    def dequant(self, codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor) -> torch.Tensor:
        return scales * (codes - zeros)


# --------------------------------------------------------------------------- packing


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """(out, in) integer codes in [0, 2^bits) -> (out, in * bits / 8) uint8, LSB first."""
    out, n = codes.shape
    if bits == 8:
        return codes.to(torch.uint8).contiguous()
    shifts = torch.arange(bits, dtype=torch.int32)
    b = ((codes.to(torch.int32)[..., None] >> shifts) & 1).reshape(out, n * bits // 8, 8)  # the bit stream
    weights = (1 << torch.arange(8, dtype=torch.int32))
    return (b * weights).sum(-1).to(torch.uint8)


def unpack(packed: torch.Tensor, bits: int, in_features: int) -> torch.Tensor:
    """Inverse of :func:`pack`: (out, in * bits / 8) uint8 -> (out, in) int32 codes."""
    if bits == 8:
        return packed.to(torch.int32)
    out = packed.shape[0]
    b = (packed.to(torch.int32)[..., None] >> torch.arange(8, dtype=torch.int32)) & 1  # (out, nbytes, 8)
    b = b.reshape(out, in_features, bits)
    return (b << torch.arange(bits, dtype=torch.int32)).sum(-1)


# --------------------------------------------------------------------------- the rule


def group_params(w: torch.Tensor, q: LayerQuant) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale (float16-rounded, as float32) and zero point per group for ``w`` (out, g*width).

    Returns (scales (out, g), zeros (out, g)), zeros as float32 integers.
    """
    out, n = w.shape
    gw = q.group_width(n)
    wg = w.float().reshape(out, n // gw, gw)
    if q.sym:
        # ggml's Q4_0/Q8_0: the value of largest magnitude maps exactly to code 0 (-2^(b-1)).
        idx = wg.abs().argmax(-1, keepdim=True)
        m = torch.gather(wg, -1, idx).squeeze(-1)
        d = (m / -(2 ** (q.bits - 1))).half().float()
        zeros = torch.full_like(d, 2 ** (q.bits - 1))
    else:
        lo = wg.amin(-1).clamp(max=0)
        hi = wg.amax(-1).clamp(min=0)
        d = ((hi - lo) / (2 ** q.bits - 1)).half().float()
        safe = torch.where(d == 0, torch.ones_like(d), d)
        zeros = torch.round(-lo / safe).clamp(0, 2 ** q.bits - 1)
    return d, zeros


def quantize_codes(w: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, q: LayerQuant) -> torch.Tensor:
    """Codes u = clamp(round(w / d) + z) for ``w`` (out, n) with per-group ``scales``/``zeros`` (out, g)."""
    out, n = w.shape
    gw = n // scales.shape[1]
    d = scales.repeat_interleave(gw, dim=1)
    z = zeros.repeat_interleave(gw, dim=1)
    safe = torch.where(d == 0, torch.ones_like(d), d)
    return torch.clamp(torch.round(w.float() / safe) + z, 0, 2 ** q.bits - 1)


def dequantize(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor) -> torch.Tensor:
    """w = d * (u - z), per group; float32 (out, n). The one rule every reader uses."""
    gw = codes.shape[1] // scales.shape[1]
    d = scales.float().repeat_interleave(gw, dim=1)
    z = zeros.float().repeat_interleave(gw, dim=1)
    return d * (codes.float() - z)


def rtn(w: torch.Tensor, q: LayerQuant) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Round-to-nearest: (codes, scales, zeros) for ``w``."""
    scales, zeros = group_params(w, q)
    return quantize_codes(w, scales, zeros, q), scales, zeros


def to_tensors(prefix: str, codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, q: LayerQuant) -> dict:
    """The safetensors entries of one quantized layer."""
    t = {f"{prefix}.qweight": pack(codes.to(torch.int32), q.bits), f"{prefix}.scales": scales.half()}
    if not q.sym:
        t[f"{prefix}.zeros"] = zeros.to(torch.uint8)
    return t


def from_tensors(prefix: str, tensors: dict, q: LayerQuant, in_features: int) -> torch.Tensor:
    """Dequantized float32 weight of one layer from its safetensors entries."""
    codes = unpack(tensors[f"{prefix}.qweight"], q.bits, in_features)
    scales = tensors[f"{prefix}.scales"]
    zeros = tensors[f"{prefix}.zeros"] if not q.sym else torch.full(scales.shape, 2 ** (q.bits - 1),
                                                                     device=scales.device)
    return dequantize(codes, scales, zeros)


def expected_shapes(prefix: str, q: LayerQuant, out_features: int, in_features: int) -> dict[str, tuple[tuple, str]]:
    """name -> (shape, safetensors dtype) of a quantized layer's tensors."""
    g = q.groups(in_features)
    shapes = {f"{prefix}.qweight": ((out_features, in_features * q.bits // 8), "U8"),
              f"{prefix}.scales": ((out_features, g), "F16")}
    if not q.sym:
        shapes[f"{prefix}.zeros"] = ((out_features, g), "U8")
    return shapes


def layer_plan(qcfg: dict) -> dict:
    """module name -> how it is stored, from a config's quantization_config: a :class:`LayerQuant`,
    or a GGML block type (:class:`itera.storage.ggml.GGMLType`) for layers written as GGUF blocks."""
    from itera.storage.ggml import TYPES

    return {name: TYPES[v["gguf_type"]] if "gguf_type" in v else LayerQuant(int(v["bits"]), v.get("group_size"),
                                                                              bool(v["sym"]))
            for name, v in qcfg["layers"].items()}


# --------------------------------------------------------------------------- GGUF blocks

GGML_BLOCK = 32  # weights per Q4_0 / Q8_0 block


def ggml_blocks(codes: torch.Tensor, scales: torch.Tensor, bits: int) -> "np.ndarray":
    """Q4_0 (bits=4) or Q8_0 (bits=8) blocks, (out, in/32 * block bytes) uint8, from symmetric
    group-32 codes and float16 scales, without re-quantizing.

    Q4_0 block: float16 d, then 16 bytes whose low nibbles are codes 0..15 of the block and high
    nibbles codes 16..31; w = d * (code - 8). Q8_0 block: float16 d, then 32 int8 q; w = d * q,
    so q = code - 128.
    """
    import numpy as np

    out, n = codes.shape
    if n % GGML_BLOCK or scales.shape[1] != n // GGML_BLOCK:
        raise ValueError("GGUF Q4_0/Q8_0 blocks need symmetric codes with one scale per 32 weights")
    nb = n // GGML_BLOCK
    d = scales.half().numpy().reshape(out, nb, 1).view(np.uint8)  # (out, nb, 2) little-endian float16
    c = codes.to(torch.int32).numpy().reshape(out, nb, GGML_BLOCK)
    if bits == 4:
        qs = (c[..., :16] | (c[..., 16:] << 4)).astype(np.uint8)
    elif bits == 8:
        qs = (c - 128).astype(np.int8).view(np.uint8)
    else:
        raise ValueError(f"no GGML block type for {bits}-bit codes")
    return np.concatenate([d.reshape(out, nb, 2), qs], axis=-1).reshape(out, -1)
