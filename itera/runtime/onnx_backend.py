"""The onnxruntime backend for ``.onnx`` files written by ``itera export``.

The tokenizer travels inside the ONNX file (metadata ``itera.tokenizer.json`` and
``itera.tokenizer_config.json``), so the file is all a deployment needs.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Sequence

import numpy as np

from itera.errors import InputError
from itera.runtime.llamacpp_backend import nll_from_logits


class OnnxRuntime:
    name = "onnxruntime"

    def __init__(self, path: Path, threads: int | None = None):
        import onnxruntime as ort

        from itera.tokenizer import Tokenizer

        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = threads
        try:
            self.session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        except Exception as e:  # onnxruntime raises its own exception types
            raise InputError(f"onnxruntime could not load {path} ({type(e).__name__}); pass an ONNX file written by "
                             "`itera export --format onnx`") from None
        meta = self.session.get_modelmeta().custom_metadata_map
        if "itera.tokenizer.json" not in meta:
            raise InputError(f"{path} carries no tokenizer; export it with `itera export --format onnx`")
        with tempfile.TemporaryDirectory() as tmp:
            Path(tmp, "tokenizer.json").write_text(meta["itera.tokenizer.json"])
            Path(tmp, "tokenizer_config.json").write_text(meta.get("itera.tokenizer_config.json", "{}"))
            self.tokenizer = Tokenizer.from_dir(Path(tmp))
        self.max_context = int(meta.get("itera.max_position_embeddings", "2048"))
        self.inputs = [i.name for i in self.session.get_inputs()]

    def logits(self, ids: Sequence[int]) -> np.ndarray:
        x = np.asarray([list(ids)], dtype=np.int64)
        return self.session.run(["logits"], {"input_ids": x})[0][0]

    def nll(self, ids: Sequence[int], n_score: int) -> list[float]:
        return nll_from_logits(self.logits(ids[:-1])[-n_score:], ids[-n_score:])

    def close(self) -> None:
        pass
