"""GGML's block types, as itera fills them from its own codes.

Every type splits a row into blocks; within a block, each *sub-block* of ``sub`` consecutive
weights shares one pair ``(a, b)`` and a weight is ``w = a * grid[u] + b`` for its code ``u``:

| type | block / sub | grid (the values codes stand for) | a, b stored as | bytes per block |
| --- | --- | --- | --- | --- |
| Q4_0, Q5_0 | 32 / 32 | -8..7, -16..15 | float16 a, b = 0 | 18, 22 |
| Q4_1, Q5_1 | 32 / 32 | 0..15, 0..31 | float16 a and b | 20, 24 |
| Q8_0 | 32 / 32 | -128..127 | float16 a, b = 0 | 34 |
| IQ4_NL | 32 / 32 | 16 non-uniform values, -127..113 | float16 a, b = 0 | 18 |
| Q2_K | 256 / 16 | 0..3 | a = d * s, b = -dmin * m; s, m 4-bit | 84 |
| Q3_K | 256 / 16 | -4..3 | a = d * s, s signed 6-bit | 110 |
| Q4_K, Q5_K | 256 / 32 | 0..15, 0..31 | a = d * s, b = -dmin * m; s, m 6-bit | 144, 176 |
| Q6_K | 256 / 16 | -32..31 | a = d * s, s int8 | 210 |
| IQ4_XS | 256 / 32 | IQ4_NL's 16 values | a = d * s, s signed 6-bit | 136 |

(``d``, ``dmin``: float16 per block.) The layouts follow ggml's public format definitions; the
tests check every type against the ``gguf`` package's own dequantizer.

A :class:`GGMLType` is also a GPTQ scheme (:func:`itera.quant.gptq.gptq`): :meth:`params` of a
block (a search for each sub-block's ``(a, b)`` minimising the importance-weighted squared error,
then the type's rounding of ``a, b`` to what it stores), :meth:`codes` and :meth:`dequant`.
Codes are computed against the stored parameters, so what itera measures is exactly what
llama.cpp reads.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from itera.storage.types import StorageType

SEARCH_WEIGHTS = 1 << 18  # weights per piece of a parameter search (GGMLType.params)
IQ4_VALUES = (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)


@dataclass(frozen=True)
class GGMLType(StorageType):
    name: str
    block: int  # weights per block; parameters are computed a block at a time
    sub: int  # weights sharing one (a, b)
    grid: tuple[int, ...]  # ascending
    affine: bool  # b is free (legacy) or -dmin * m (K types); otherwise b = 0
    nbytes: int  # bytes per block
    scale_bits: int | None = None  # K types: bits of the integer sub-block scales; None: float16 a, b
    _grid: torch.Tensor = field(init=False, repr=False, compare=False)
    _table: torch.Tensor = field(init=False, repr=False, compare=False)

    kind = "ggml"

    def __post_init__(self):
        object.__setattr__(self, "_grid", torch.tensor(self.grid, dtype=torch.float32))
        # non-uniform grids: the code of every x rounded up to a half-integer (each midpoint between
        # two integer grid values is one), from 2 * grid[0] - 1 to 2 * grid[-1] + 1
        halves = torch.arange(2 * self.grid[0] - 1, 2 * self.grid[-1] + 2, dtype=torch.float32) / 2
        object.__setattr__(self, "_table", torch.bucketize(halves, (self._grid[1:] + self._grid[:-1]) / 2))

    @property
    def gguf_type(self) -> str:
        return self.name

    def describe(self) -> dict:
        return {"type": self.name, "bits_per_weight": self.bits_per_weight()}

    @property
    def uniform(self) -> bool:
        return self.grid == tuple(range(self.grid[0], self.grid[-1] + 1))

    # ------------------------------------------------------------------ sizes

    @property
    def group_size(self) -> int:  # GPTQ: parameters come from the error-updated weights, a block at a time
        return self.block

    def group_width(self, n: int) -> int:
        return self.block

    def fits(self, cols: int) -> bool:
        return cols % self.block == 0

    def tensor_bytes(self, rows: int, cols: int) -> int:
        return rows * cols // self.block * self.nbytes

    def bits_per_weight(self) -> float:
        return self.nbytes * 8 / self.block

    def label(self) -> str:
        return self.name

    # ------------------------------------------------------------------ in an itera checkpoint

    def as_dict(self) -> dict:
        return {"gguf_type": self.name}

    def shapes(self, prefix: str, out_features: int, in_features: int) -> dict[str, tuple[tuple, str]]:
        """A layer stored as this type's blocks: ``<prefix>.ggml``, uint8 (out, bytes per row)."""
        return {f"{prefix}.ggml": ((out_features, in_features // self.block * self.nbytes), "U8")}

    def tensors(self, prefix: str, u: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> dict:
        return {f"{prefix}.ggml": torch.from_numpy(self.encode(u.cpu(), a.cpu(), b.cpu()))}

    def weight(self, prefix: str, tensors: dict, out_features: int, in_features: int) -> torch.Tensor:
        return self.decode(tensors[f"{prefix}.ggml"].numpy(), out_features, in_features)

    # ------------------------------------------------------------------ the scheme: w = a * grid[u] + b

    def params(self, w: torch.Tensor, importance: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(a, b), each (rows, n / sub), for ``w`` (rows, n) with n a multiple of the block, as the
        type stores them. ``importance`` (n,) weighs each column's squared error (llama.cpp's
        importance matrix: the mean square of that input); None weighs all alike.

        Rows are searched SEARCH_WEIGHTS weights at a time (every row on its own, so the result is
        the same): the search's temporaries then stay in cache instead of faulting in fresh pages
        for every candidate, three times faster on a 5632 x 2048 matrix."""
        rows, n = w.shape
        wt = torch.ones(n, device=w.device) if importance is None else importance.float().to(w.device)
        wt = (wt + 1e-8 * wt.mean().clamp(min=1e-30)).reshape(1, n // self.sub, self.sub)
        search = self._search_affine if self.affine else self._search_sym
        parts = [search(w[r].float().reshape(-1, n // self.sub, self.sub), wt) for r in _pieces(rows, n)]
        a, b = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
        if self.scale_bits is None:
            return a.half().float(), b.half().float()
        return self._two_level(a, b)

    def codes(self, w: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """Index of the nearest grid value to ``(w - b) / a`` (float tensor of indices; the lower
        one at a tie)."""
        safe = torch.where(a == 0, torch.ones_like(a), a)
        x = (w.float() - b) / safe
        if self.uniform:
            u = torch.clamp(torch.round(x) - self.grid[0], 0, len(self.grid) - 1)
        else:  # a table lookup: x rounded up to a half-integer has x's code (a table 2.5x faster than a search)
            lo = 2 * self.grid[0] - 1
            u = self._table.to(w.device)[(torch.ceil(x * 2).clamp(lo, 2 * self.grid[-1] + 1) - lo).long()]
        zero = int(torch.argmin(self._grid.abs()))  # a == 0: every code gives b; take the one nearest zero
        return torch.where(a == 0, zero, u).float()

    def dequant(self, u: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return a * self._grid.to(u.device)[u.long()] + b

    # ------------------------------------------------------------------ whole tensors

    def quantize(self, w: torch.Tensor, importance: torch.Tensor | None = None):
        """Round-to-nearest with searched parameters: (codes (rows, n), a, b (rows, n / sub)).
        Codes are found a piece of rows at a time: no full-size temporaries beside the codes."""
        a, b = self.params(w, importance)
        u = torch.empty(w.shape, device=w.device)
        for r in _pieces(*w.shape):
            u[r] = self.codes(w[r], *self.expand_params(a[r], b[r]))
        return u, a, b

    def expand_params(self, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return a.repeat_interleave(self.sub, 1), b.repeat_interleave(self.sub, 1)

    def expand(self, u: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """Float32 weights (rows, n) from codes and per-sub-block parameters."""
        return self.dequant(u, *self.expand_params(a, b))

    # ------------------------------------------------------------------ the parameter search

    def _search_sym(self, x: torch.Tensor, wt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """b = 0; candidates map the sub-block's value of largest magnitude (sign kept) near the
        grid's most negative value; each is refitted by weighted least squares on its codes, which
        leaves the error sum(wt x^2) - (sum wt g x)^2 / sum(wt g^2): the best candidate has the
        largest second term."""
        grid = self._grid.to(x.device)
        idx = x.abs().argmax(-1, keepdim=True)
        m = torch.gather(x, -1, idx)  # (rows, S, 1)
        wx = wt * x
        best_a, best_gain = None, None
        for t in torch.linspace(0.85, 1.15, 13).tolist():
            a0 = m / (grid[0] * t)
            u = self.codes(x, a0, 0)
            g = u + grid[0] if self.uniform else grid[u.long()]
            gx, den = (wx * g).sum(-1, keepdim=True), (wt * g * g).sum(-1, keepdim=True)
            ok = den > 0
            a = torch.where(ok, gx / den.clamp(min=1e-30), a0)
            gain = torch.where(ok, gx * gx / den.clamp(min=1e-30), torch.zeros_like(den))
            if best_a is None:
                best_a, best_gain = a, gain
            else:
                better = gain > best_gain
                best_a, best_gain = torch.where(better, a, best_a), torch.where(better, gain, best_gain)
        return best_a[..., 0], torch.zeros_like(best_a[..., 0])

    def _search_affine(self, x: torch.Tensor, wt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Codes from a stretched min-max range, then (a, b) by weighted least squares on them;
        K types keep b <= 0 (they store -b as a non-negative minimum)."""
        top = len(self.grid) - 1
        lo, hi = x.amin(-1, keepdim=True), x.amax(-1, keepdim=True)
        if self.scale_bits is not None:
            lo = lo.clamp(max=0)
        span = (hi - lo).clamp(min=1e-30)
        sw, wx = wt.sum(-1, keepdim=True), wt * x
        sx = wx.sum(-1, keepdim=True)
        best, best_err = None, None
        for t in torch.linspace(0.9, 1.2, 13).tolist():
            u = torch.clamp(torch.round((x - lo) * (top * t / span)), 0, top)
            wu = wt * u
            su, suu, sux = wu.sum(-1, keepdim=True), (wu * u).sum(-1, keepdim=True), (wx * u).sum(-1, keepdim=True)
            det = sw * suu - su * su
            ok = det > 1e-30 * sw * suu
            a = torch.where(ok, (sw * sux - su * sx) / torch.where(ok, det, 1), span / top)
            b = torch.where(ok, (suu * sx - su * sux) / torch.where(ok, det, 1), lo)
            if self.scale_bits is not None:  # b <= 0, a >= 0
                pos = b > 0
                a = torch.where(pos, sux / suu.clamp(min=1e-30), a)
                b = torch.where(pos, torch.zeros_like(b), b)
                a = a.clamp(min=0)
            # the weighted squared error less sum(wt x^2), the same for every candidate, from the sums
            a64, b64 = a.double(), b.double()
            err = a64 * a64 * suu + 2 * a64 * b64 * su + b64 * b64 * sw - 2 * a64 * sux - 2 * b64 * sx
            if best is None:
                best, best_err = (a, b), err
            else:
                better = err < best_err
                best = (torch.where(better, a, best[0]), torch.where(better, b, best[1]))
                best_err = torch.where(better, err, best_err)
        return best[0][..., 0], best[1][..., 0]

    def _two_level(self, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """K types: each block's sub-block parameters become small integers times a float16 ``d``
        (and ``dmin``); the integer of largest magnitude is the type's extreme."""
        rows, s = a.shape
        per = self.block // self.sub
        a = a.reshape(rows, s // per, per)
        if self.affine:
            top = 2 ** self.scale_bits - 1
            a_q = _round_levels(a, top, 0, top)
            b_q = -_round_levels(-b.reshape(rows, s // per, per), top, 0, top)
            return a_q.reshape(rows, s), b_q.reshape(rows, s)
        lo = -(2 ** (self.scale_bits - 1))
        return _round_levels(a, lo, lo, -lo - 1).reshape(rows, s), torch.zeros(rows, s, device=a.device)

    # ------------------------------------------------------------------ the bytes

    def block_ints(self, a: torch.Tensor, b: torch.Tensor) -> dict[str, np.ndarray]:
        """The stored numbers behind ``(a, b)``: float16 ``d`` (and ``dmin``) per block and integer
        sub-block scales (and minimums) for K types; float16 ``a`` (and ``b``) otherwise. Checks
        that they give back ``a, b`` exactly."""
        rows, s = a.shape
        if self.scale_bits is None:
            out = {"d": a.half().numpy()}
            if self.affine:
                out["m"] = b.half().numpy()
            if not (torch.equal(a.half().float(), a) and torch.equal(b.half().float(), b)):
                raise ValueError(f"{self.name}: parameters are not float16 values")
            return out
        per = self.block // self.sub
        ab = a.reshape(rows, s // per, per)
        if self.affine:
            top = 2 ** self.scale_bits - 1
            d, sc = _levels_of(ab, top)
            dmin, mn = _levels_of(-b.reshape(rows, s // per, per), top)
            back_b = -(dmin.float()[..., None] * mn)
        else:
            d, sc = _levels_of(ab, -(2 ** (self.scale_bits - 1)))
            dmin, mn, back_b = None, None, torch.zeros_like(ab)
        if not (torch.equal(d.float()[..., None] * sc, ab) and torch.equal(back_b.reshape(rows, s), b)):
            raise ValueError(f"{self.name}: parameters are not the type's two-level values")
        out = {"d": d.numpy(), "sc": sc.to(torch.int64).numpy()}
        if self.affine:
            out.update(dmin=dmin.numpy(), m=mn.to(torch.int64).numpy())
        return out

    def encode(self, u: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> np.ndarray:
        """The type's blocks, (rows, n / block * nbytes) uint8, from codes and parameters (a piece
        of rows at a time: the encoders' integer temporaries are several times the codes)."""
        rows, n = u.shape
        nb = n // self.block
        out = np.empty((rows, nb, self.nbytes), dtype=np.uint8)
        for r in _pieces(rows, n):
            k = r.stop - r.start
            c = u[r].to(torch.int64).numpy().reshape(k, nb, self.block)
            p = self.block_ints(a[r], b[r])
            parts = _ENCODERS[self.name](self, c, {key: v.reshape(k, nb, -1) for key, v in p.items()})
            out[r] = np.concatenate([np.ascontiguousarray(x).reshape(k, nb, -1).view(np.uint8) for x in parts], -1)
        return out.reshape(rows, nb * self.nbytes)

    def decode(self, blocks: np.ndarray, rows: int, cols: int) -> torch.Tensor:
        """Float32 weights (rows, cols) from the type's blocks, by the ``gguf`` package's dequantizer."""
        import gguf

        x = gguf.quants.dequantize(np.ascontiguousarray(blocks).reshape(rows, -1),
                                   getattr(gguf.GGMLQuantizationType, self.name))
        return torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).reshape(rows, cols)


def _pieces(rows: int, cols: int) -> list[slice]:
    """Row slices of about SEARCH_WEIGHTS weights each (at least one row), covering ``rows``."""
    step = max(1, SEARCH_WEIGHTS // cols)
    return [slice(r, min(r + step, rows)) for r in range(0, rows, step)]


def _round_levels(v: torch.Tensor, ext: int, lo: int, hi: int) -> torch.Tensor:
    """Per block (last dim): v = d * i with float16 d and integers i in [lo, hi]; the value of
    largest magnitude (sign kept) maps to ``ext``."""
    idx = v.abs().argmax(-1, keepdim=True)
    m = torch.gather(v, -1, idx)
    d = (m / ext).half().float()
    safe = torch.where(d == 0, torch.ones_like(d), d)
    i = torch.where(d == 0, torch.zeros_like(v), torch.clamp(torch.round(v / safe), lo, hi))
    return d * i


def _levels_of(v: torch.Tensor, ext: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of :func:`_round_levels` on its output: (float16 d per block, integers)."""
    idx = v.abs().argmax(-1, keepdim=True)
    m = torch.gather(v, -1, idx)
    d = (m / ext).half()
    safe = torch.where(d == 0, torch.ones_like(d), d).float()
    return d[..., 0], torch.where(d.float() == 0, torch.zeros_like(v), torch.round(v / safe))


# ---------------------------------------------------------------------- byte layouts


def _f16(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x.astype(np.float16)).view(np.uint8)


def _nibbles(c: np.ndarray) -> np.ndarray:
    """32 codes per group -> 16 bytes: byte j holds code j (low half) and j + 16 (high half)."""
    g = c.reshape(*c.shape[:-1], -1, 32) & 0xF
    return (g[..., :16] | (g[..., 16:] << 4)).astype(np.uint8).reshape(*c.shape[:-1], -1)


def _bits(c: np.ndarray, shift: int) -> np.ndarray:
    """Bit ``shift`` of 32 codes -> a little-endian uint32 per 32."""
    b = ((c.reshape(*c.shape[:-1], -1, 32) >> shift) & 1).astype(np.uint32)
    return (b << np.arange(32, dtype=np.uint32)).sum(-1, dtype=np.uint32)


def _legacy(t: GGMLType, c: np.ndarray, p: dict) -> list:
    parts = [_f16(p["d"])] + ([_f16(p["m"])] if t.affine else [])
    if t.name == "Q8_0":
        return parts + [(c - 128).astype(np.int8)]
    if len(t.grid) == 32:
        parts.append(_bits(c, 4))
    return parts + [_nibbles(c)]


def _crumbs(c: np.ndarray) -> np.ndarray:
    """Q2_K/Q3_K low two bits: weight 128n + 32j + l sits in byte 32n + l at bits 2j."""
    g = (c & 3).reshape(*c.shape[:-1], 2, 4, 32)
    return (g << (2 * np.arange(4)).reshape(4, 1)).sum(-2).astype(np.uint8).reshape(*c.shape[:-1], 64)


def _k_scales(sc: np.ndarray, mn: np.ndarray) -> np.ndarray:
    """Q4_K/Q5_K: eight 6-bit scales and minimums in 12 bytes."""
    sc, mn = sc.astype(np.uint8), mn.astype(np.uint8)
    first = sc[..., :4] | ((sc[..., 4:] >> 4) << 6)
    second = mn[..., :4] | ((mn[..., 4:] >> 4) << 6)
    third = (sc[..., 4:] & 0xF) | ((mn[..., 4:] & 0xF) << 4)
    return np.concatenate([first, second, third], -1)


def _q2_k(t, c, p):
    scales = (p["sc"] | (p["m"] << 4)).astype(np.uint8)
    return [scales, _crumbs(c), _f16(p["d"]), _f16(p["dmin"])]


def _q3_k(t, c, p):
    hmask = ((c >> 2) & 1).reshape(*c.shape[:-1], 8, 32)  # bit 4n + j: the 32 weights at 128n + 32j
    hmask = (hmask << np.arange(8).reshape(8, 1)).sum(-2).astype(np.uint8)
    s = (p["sc"] + 32).astype(np.uint8)  # 16 six-bit values
    low, high = s & 0xF, s >> 4
    packed = np.concatenate([low[..., 0:4] | (low[..., 8:12] << 4), low[..., 4:8] | (low[..., 12:16] << 4),
                             high[..., 0:4] | (high[..., 4:8] << 2) | (high[..., 8:12] << 4) | (high[..., 12:16] << 6)],
                            -1).astype(np.uint8)
    return [hmask, _crumbs(c), packed, _f16(p["d"])]


def _q45_k(t, c, p):
    g = c.reshape(*c.shape[:-1], 4, 2, 32)  # 64 weights per chunk: low nibbles, then high nibbles
    qs = ((g[..., 0, :] & 0xF) | ((g[..., 1, :] & 0xF) << 4)).astype(np.uint8).reshape(*c.shape[:-1], 128)
    parts = [_f16(p["d"]), _f16(p["dmin"]), _k_scales(p["sc"], p["m"])]
    if t.name == "Q5_K":  # fifth bits: byte l, bit 2k (+1) for weight 64k + l (+ 32)
        h = ((c >> 4) & 1).reshape(*c.shape[:-1], 8, 32)
        parts.append((h << np.arange(8).reshape(8, 1)).sum(-2).astype(np.uint8))
    return parts + [qs]


def _q6_k(t, c, p):
    g = c.reshape(*c.shape[:-1], 2, 4, 32)  # per 128: quarters at 0, 32, 64, 96
    ql = np.concatenate([(g[..., 0, :] & 0xF) | ((g[..., 2, :] & 0xF) << 4),
                         (g[..., 1, :] & 0xF) | ((g[..., 3, :] & 0xF) << 4)], -1).astype(np.uint8)
    qh = sum(((g[..., k, :] >> 4) & 3) << (2 * k) for k in range(4)).astype(np.uint8)
    return [ql.reshape(*c.shape[:-1], 128), qh.reshape(*c.shape[:-1], 64), p["sc"].astype(np.int8), _f16(p["d"])]


def _iq4_xs(t, c, p):
    s = (p["sc"] + 32).astype(np.uint16)  # eight six-bit values
    high = ((s >> 4) << (2 * np.arange(8, dtype=np.uint16))).sum(-1, dtype=np.uint16)[..., None]
    low = (s & 0xF).astype(np.uint8)
    return [_f16(p["d"]), high, (low[..., 0::2] | (low[..., 1::2] << 4)).astype(np.uint8), _nibbles(c)]


_ENCODERS = {"Q4_0": _legacy, "Q4_1": _legacy, "Q5_0": _legacy, "Q5_1": _legacy, "Q8_0": _legacy,
             "IQ4_NL": _legacy, "Q2_K": _q2_k, "Q3_K": _q3_k, "Q4_K": _q45_k, "Q5_K": _q45_k, "Q6_K": _q6_k,
             "IQ4_XS": _iq4_xs}


def _r(lo: int, hi: int) -> tuple[int, ...]:
    return tuple(range(lo, hi + 1))


TYPES: dict[str, GGMLType] = {t.name: t for t in (
    GGMLType("Q2_K", 256, 16, _r(0, 3), True, 84, scale_bits=4),
    GGMLType("Q3_K", 256, 16, _r(-4, 3), False, 110, scale_bits=6),
    GGMLType("IQ4_XS", 256, 32, IQ4_VALUES, False, 136, scale_bits=6),
    GGMLType("Q4_0", 32, 32, _r(-8, 7), False, 18),
    GGMLType("IQ4_NL", 32, 32, IQ4_VALUES, False, 18),
    GGMLType("Q4_K", 256, 32, _r(0, 15), True, 144, scale_bits=6),
    GGMLType("Q4_1", 32, 32, _r(0, 15), True, 20),
    GGMLType("Q5_0", 32, 32, _r(-16, 15), False, 22),
    GGMLType("Q5_K", 256, 32, _r(0, 31), True, 176, scale_bits=6),
    GGMLType("Q5_1", 32, 32, _r(0, 31), True, 24),
    GGMLType("Q6_K", 256, 16, _r(-32, 31), False, 210, scale_bits=8),
    GGMLType("Q8_0", 32, 32, _r(-128, 127), False, 34),
)}


# What llama.cpp's CPU backend does to a matrix product's input before it meets a weight of each
# type (ggml-cpu's ``vec_dot_type``): rounded to float16 or bfloat16, or quantized to 8 bits in
# blocks of 32 with a float16 scale (Q8_0, Q8_1) or in blocks of 256 with a float32 scale (Q8_K).
Q8_0_INPUT = {"Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "IQ4_NL"}
Q8_K_INPUT = {"Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "IQ4_XS"}


def input_as_llama_cpp(x, weight_type: str):
    """``x`` (float32, last dimension the product's inner one) as llama.cpp's CPU backend hands it
    to a product with a ``weight_type`` weight (ggml's quantize_row_q8_0 / q8_K, round to nearest
    even as its SIMD paths do)."""
    if weight_type == "F16":
        return x.half().float()
    if weight_type == "BF16":
        return x.bfloat16().float()
    if weight_type in Q8_0_INPUT:
        b = x.reshape(*x.shape[:-1], -1, 32)
        d = b.abs().amax(-1, keepdim=True) / 127
        q = torch.round(b * torch.where(d > 0, 1 / d, torch.zeros_like(d)))
        return (q * d.half().float()).reshape(x.shape)
    if weight_type in Q8_K_INPUT:
        b = x.reshape(*x.shape[:-1], -1, 256)
        m = b.gather(-1, b.abs().argmax(-1, keepdim=True))  # the value of largest magnitude, sign kept
        iscale = torch.where(m != 0, -127 / m, torch.zeros_like(m))
        q = torch.round(b * iscale).clamp(max=127)
        return (q * torch.where(m != 0, 1 / iscale, torch.zeros_like(m))).reshape(x.shape)
    return x


def round_inputs_as_llama_cpp(module, weight_type: str):
    """Registers a forward pre-hook on ``module`` (a matrix product) that rounds its input as
    llama.cpp's CPU backend does for a ``weight_type`` weight; returns the hook's handle."""
    return module.register_forward_pre_hook(lambda _m, args: (input_as_llama_cpp(args[0], weight_type),))
