"""The export formats, one typed row each: the checks a source must pass, the writer, and the
verifier that runs the written file in its runtime (:func:`itera.jobs.export.run_export` does the
staging, the tolerance gate and the atomic rename for every row alike).

A row's name is the ``--format`` value and the record's artifact format, and names a kind in
:data:`itera.artifacts.KINDS` (its suffix, magic bytes, companions and runtime). A new format is a
module with the three functions, a row here, and a row there.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from itera.artifacts import KINDS
from itera.export import gguf, onnx, torchfmt
from itera.export.trace import check_traceable


@dataclass(frozen=True)
class ExportFormat:
    name: str
    check: Callable  # (cfg, opts) -> None: refuse what this format cannot hold, before any work
    write: Callable  # (src, opts, staging, reporter) -> info: write to staging.main (and staging.temp(...))
    verify: Callable  # (src, opts, path, info) -> (runtime logits, file logits or None, figures, problems)

    @property
    def suffix(self) -> str:
        return next(k.suffix for k in KINDS if k.format == self.name)


FORMATS = {f.name: f for f in (
    ExportFormat("gguf", gguf.check, gguf.write, gguf.verify),
    ExportFormat("onnx", check_traceable, onnx.write, onnx.verify),
    ExportFormat("pt2", check_traceable, torchfmt.write_pt2, torchfmt.verify_pt2),
    ExportFormat("torchscript", check_traceable, torchfmt.write_torchscript, torchfmt.verify_torchscript),
)}
