"""``--method auto``'s budget, in the bytes a user ships: every tensor of the GGUF file.

The file's size is known before anything is quantized: :func:`itera.export.gguf.layout` measures
the part that does not depend on the types (header, metadata with the vocabulary, tensor
directory, the F32 norms), and each matrix costs its type's bytes, padded to the file's alignment.
``--target-bytes`` budgets the whole file; ``--target-bpw`` budgets bits per weight over every
tensor's data (what llama.cpp prints as BPW). A budget outside what the candidate types can
reach is refused before the model is loaded, naming the achievable range.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from itera.errors import InputError, UsageError
from itera.storage import types as storage
from itera.storage import by_name
from itera.storage.ggml import TYPES

F16 = storage.F16.name  # plans and budgets name their types; this one is float16


def matrix_bytes(t: str, rows: int, cols: int) -> int:
    return by_name(t).tensor_bytes(rows, cols)


def candidates(cols: int, types) -> list[str]:
    """The candidate types a matrix of ``cols`` input columns can be stored in (F16 always)."""
    return [t for t in types if t != F16 and by_name(t).fits(cols)] + [F16]


@dataclass
class Budget:
    layout: object  # itera.export.gguf.Layout
    flag: str  # --target-bytes | --target-bpw
    target: float
    costs: dict[str, dict[str, int]]  # module -> {type: bytes counted against the budget}
    available: int  # bytes left for the matrices

    def figures(self) -> dict:
        return {"flag": self.flag, "target": self.target, "available_matrix_bytes": self.available}


def make_budget(layout, types, target_bytes: int | None, target_bpw: float | None) -> Budget:
    """Costs per module and type, and the bytes the matrices may use; refuses a budget outside
    [every matrix in its smallest candidate, every matrix F16]."""
    by_bytes = target_bytes is not None
    costs = {}
    for module, (rows, cols) in layout.matrices.items():
        costs[module] = {t: (layout.padded(matrix_bytes(t, rows, cols)) if by_bytes else matrix_bytes(t, rows, cols))
                         for t in candidates(cols, types)}
    lo = sum(min(c.values()) for c in costs.values())
    hi = sum(c[F16] for c in costs.values())
    if by_bytes:
        fixed = layout.meta_bytes + layout.fixed_bytes
        if not fixed + lo <= target_bytes <= fixed + hi:
            raise UsageError(f"--target-bytes {target_bytes} is outside what this model's GGUF file can be: "
                             f"{fixed + lo} bytes (every matrix in its smallest candidate type) to {fixed + hi} "
                             "(all F16); pass a budget in that range")
        return Budget(layout, "--target-bytes", target_bytes, costs, int(target_bytes) - fixed)
    fixed = 4 * layout.fixed_weights  # the 1-D tensors, F32
    lo_bpw, hi_bpw = (fixed + lo) * 8 / layout.weights, (fixed + hi) * 8 / layout.weights
    if not lo_bpw <= target_bpw <= hi_bpw:
        raise UsageError(f"--target-bpw {target_bpw} is outside what this model's GGUF file can be: "
                         f"{lo_bpw:.3f} bits per weight (every matrix in its smallest candidate type) to "
                         f"{hi_bpw:.3f} (all F16); pass a budget in that range")
    return Budget(layout, "--target-bpw", target_bpw, costs, int(target_bpw * layout.weights / 8) - fixed)


def gguf_figures(layout, types: dict[str, str]) -> dict:
    """Bytes and bits per weight (over every tensor) of the GGUF file that ``types`` (module ->
    type; modules not named are F16) makes."""
    raw = {m: matrix_bytes(types.get(m, F16), r, c) for m, (r, c) in layout.matrices.items()}
    data = sum(raw.values()) + 4 * layout.fixed_weights
    return {"gguf_bytes": layout.file_bytes(raw), "gguf_bits_per_weight": data * 8 / layout.weights}


def read_plan(path: Path, modules: dict[str, tuple[int, int]]) -> dict[str, str]:
    """module -> type from a quant_plan.json, checked against this model's matrices."""
    try:
        types = json.loads(Path(path).read_text())["types"]
        types = {str(k): str(v).upper() for k, v in types.items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        raise InputError(f"--plan {path} is not a plan file written by `itera quantize --method auto` "
                         "(quant_plan.json with \"types\")") from None
    unknown = sorted(set(types) ^ set(modules))
    if unknown:
        raise InputError(f"--plan {path} does not match this model's tensors (e.g. {unknown[0]})")
    for module, t in types.items():
        if t not in candidates(modules[module][1], TYPES):
            raise InputError(f"--plan {path} gives {module} type {t!r}, which cannot store its "
                             f"{modules[module][1]} input columns; use one of "
                             f"{', '.join(candidates(modules[module][1], TYPES))}")
    return types
