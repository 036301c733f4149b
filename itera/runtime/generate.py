"""Greedy generation with each runtime's KV cache, one step at a time.

A :class:`Stepper` feeds the prompt once (``prefill``) and then one token per call (``step``),
each returning the next greedy token. ``benchmark-power`` times these calls; ``export`` checks
the ONNX KV-cache graph with them; ``scripts/bench_runtimes.py`` measures decode speed.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from itera.errors import InputError


class Stepper:
    """Greedy generation with a runtime's KV cache: ``prefill(ids) -> next``, ``step(tok) -> next``."""

    def prefill(self, ids: list[int]) -> int: ...

    def step(self, token: int) -> int: ...


class TorchStepper(Stepper):
    def __init__(self, rt):
        self.rt = rt

    def _next(self, ids: list[int]) -> int:
        import torch

        with torch.inference_mode():
            x = torch.tensor([ids], device=self.rt.device)
            return int(self.rt.model(x, cache=self.cache)[0, -1].argmax())

    def prefill(self, ids):
        from itera.model.llama import KVCache

        self.cache = KVCache()
        return self._next(list(ids))

    def step(self, token):
        return self._next([token])


class LlamaCppStepper(Stepper):
    def __init__(self, rt):
        self.llm = rt.llm

    def _next(self) -> int:
        return int(np.argmax(self.llm.scores[self.llm.n_tokens - 1]))

    def prefill(self, ids):
        self.llm.reset()
        self.llm.eval(list(ids))
        return self._next()

    def step(self, token):
        self.llm.eval([token])
        return self._next()


class OnnxStepper(Stepper):
    """Runs the ``*.kv.onnx`` graph written by ``itera export``: past caches in, present out."""

    def __init__(self, kv_file: Path, threads: int | None = None):
        import onnxruntime as ort

        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = threads
        self.s = ort.InferenceSession(str(kv_file), opts, providers=["CPUExecutionProvider"])
        self.past_inputs = [i for i in self.s.get_inputs() if i.name.startswith("past_")]
        self.out_names = [o.name for o in self.s.get_outputs()]

    def _run(self, ids):
        res = self.s.run(None, {"input_ids": np.asarray([ids], np.int64), **self.past})
        self.past = {n.replace("present", "past"): v for n, v in zip(self.out_names[1:], res[1:])}
        return int(res[0][0, -1].argmax())

    def prefill(self, ids):
        # (batch, kv_heads, 0, head_dim): an empty cache
        self.past = {i.name: np.zeros((1, i.shape[1], 0, i.shape[3]), np.float32) for i in self.past_inputs}
        return self._run(list(ids))

    def step(self, token):
        return self._run([token])


def stepper_for(rt, path: Path, threads: int | None = None) -> Stepper:
    """The stepper for a runtime opened on ``path`` (an .onnx needs its .kv.onnx beside it)."""
    if rt.name == "torch":
        return TorchStepper(rt)
    if rt.name == "llama.cpp":
        return LlamaCppStepper(rt)
    from itera.export.onnx import kv_path

    kv = kv_path(Path(path))
    if not kv.is_file():
        raise InputError(f"{path} has no KV-cache graph {kv.name} beside it; re-export with `itera export --format onnx`")
    return OnnxStepper(kv, threads)


def greedy(stepper: Stepper, prompt: list[int], new_tokens: int) -> list[int]:
    """``new_tokens`` greedy tokens after ``prompt``."""
    out = [stepper.prefill(prompt)]
    while len(out) < new_tokens:
        out.append(stepper.step(out[-1]))
    return out[:new_tokens]
