"""The onnxruntime backend for ``.onnx`` files written by ``itera export``.

The tokenizer travels inside the ONNX file (metadata ``itera.tokenizer.json`` and
``itera.tokenizer_config.json``), so the file is all a deployment needs. Generation uses the
KV-cache graph beside it: ``NAME.kv.onnx`` for ``NAME.onnx`` (:func:`itera.artifacts.kv_path`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Sequence

import numpy as np

from itera.artifacts import kv_path
from itera.errors import InputError
from itera.runtime.base import RuntimeBase, Stepper


def _session(path: Path, threads: int | None):
    """An inference session computing with ``threads`` CPU threads (default: the cores this
    process may use), so that records can say how many it used."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads or len(os.sched_getaffinity(0))
    opts.log_severity_level = 3  # onnxruntime's warnings are for its developers, not the user's screen
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


class OnnxRuntime(RuntimeBase):
    name = "onnxruntime"
    _kv_session = None  # the KV-cache graph's session, made by the first stepper()

    def __init__(self, path: Path, threads: int | None = None):
        from itera.tokenizer import Tokenizer

        self.path, self.threads = Path(path), threads or len(os.sched_getaffinity(0))
        try:
            self.session = _session(path, threads)
        except Exception as e:  # onnxruntime raises its own exception types
            raise InputError(f"onnxruntime could not load {path} ({type(e).__name__}); pass an ONNX file written by "
                             "`itera export --format onnx`") from None
        meta = self.session.get_modelmeta().custom_metadata_map
        if "itera.tokenizer.json" not in meta:
            raise InputError(f"{path} carries no tokenizer; export it with `itera export --format onnx`")
        try:
            tcfg = json.loads(meta.get("itera.tokenizer_config.json", "{}"))
        except ValueError:
            raise InputError(f"{path}: metadata itera.tokenizer_config.json is not JSON; re-export the model") from None
        self.tokenizer = Tokenizer.from_strings(meta["itera.tokenizer.json"], tcfg if isinstance(tcfg, dict) else {},
                                                source=f"{path} (metadata itera.tokenizer.json)")
        ctx = meta.get("itera.max_position_embeddings", "2048")
        if not ctx.isascii() or not ctx.isdigit() or not 2 <= int(ctx) <= 1 << 24:
            raise InputError(f"{path}: metadata itera.max_position_embeddings is {ctx!r}, not a context length "
                             "(2 or more tokens); re-export the model")
        self.max_context = int(ctx)

    def logits(self, ids: Sequence[int]) -> np.ndarray:
        x = np.asarray([list(ids)], dtype=np.int64)
        return self.session.run(["logits"], {"input_ids": x})[0][0]

    def stepper(self) -> "OnnxStepper":
        """A stepper on the KV-cache graph; every stepper of this runtime shares one session
        (onnxruntime runs one session from several threads at once), each with its own cache."""
        kv = kv_path(self.path)
        if not kv.is_file():
            raise InputError(f"{self.path} has no KV-cache graph {kv.name} beside it; "
                             "re-export with `itera export --format onnx`")
        if self._kv_session is None:
            self._kv_session = _session(kv, self.threads)
        return OnnxStepper(kv, self.threads, session=self._kv_session)


class OnnxStepper(Stepper):
    """Runs a ``*.kv.onnx`` graph written by ``itera export``: past caches in, present out."""

    def __init__(self, kv_file: Path, threads: int | None = None, session=None):
        self.s = session if session is not None else _session(kv_file, threads)
        self.past_inputs = [i for i in self.s.get_inputs() if i.name.startswith("past_")]
        self.out_names = [o.name for o in self.s.get_outputs()]

    def _run(self, ids) -> np.ndarray:
        res = self.s.run(None, {"input_ids": np.asarray([ids], np.int64), **self.past})
        self.past = {n.replace("present", "past"): v for n, v in zip(self.out_names[1:], res[1:])}
        return np.asarray(res[0][0, -1], dtype=np.float32)  # (vocab,)

    def prefill_logits(self, ids):
        # (batch, kv_heads, 0, head_dim): an empty cache
        self.past = {i.name: np.zeros((1, i.shape[1], 0, i.shape[3]), np.float32) for i in self.past_inputs}
        return self._run(list(ids))

    def step_logits(self, token):
        return self._run([token])
