"""What every runtime backend shares: the context-manager shape, NLL from logits, how two runtimes'
logits are compared, and generation with a KV cache, one step at a time (:class:`Stepper`)."""

from __future__ import annotations

from typing import Sequence

import numpy as np


def nll_from_logits(logits: np.ndarray, targets: Sequence[int]) -> list[float]:
    """Negative log-likelihoods of ``targets`` under (n, vocab) ``logits``, in float64."""
    x = logits.astype(np.float64)
    m = x.max(-1, keepdims=True)
    logz = (m + np.log(np.exp(x - m).sum(-1, keepdims=True)))[:, 0]
    return (logz - x[np.arange(len(targets)), np.asarray(targets)]).tolist()


def compare(ref: np.ndarray, got: np.ndarray) -> dict:
    """|logit diff| and top-1 agreement of ``got`` against ``ref`` (both (T, V))."""
    diff = np.abs(ref.astype(np.float64) - got.astype(np.float64))
    centred = ref.astype(np.float64) - ref.mean(-1, keepdims=True)
    rms = float(np.sqrt((diff ** 2).mean()) / max(np.sqrt((centred ** 2).mean()), 1e-12))
    return {"max_abs_logit_diff": float(diff.max()), "mean_abs_logit_diff": float(diff.mean()),
            "rel_rms": rms, "top1_agreement": float((ref.argmax(-1) == got.argmax(-1)).mean())}


class Stepper:
    """Generation with a runtime's KV cache, one token at a time.

    A backend implements two calls that return the next-token logits, a (vocab,) float32 array
    the caller owns: ``prefill_logits(ids)`` starts a new sequence (the cache is cleared) and
    ``step_logits(token)`` appends one token. Greedy decoding (``prefill(ids) -> next``,
    ``step(tok) -> next``) is their argmax, so greedy and sampled generation
    (:mod:`itera.runtime.sampling`) run the same code. ``benchmark-power`` times these calls;
    ``export`` checks the ONNX KV-cache graph with them; ``serve`` samples from them.

    A stepper holds one sequence: use one stepper per concurrent generation."""

    def prefill_logits(self, ids: Sequence[int]) -> np.ndarray:
        raise NotImplementedError

    def step_logits(self, token: int) -> np.ndarray:
        raise NotImplementedError

    def prefill(self, ids: Sequence[int]) -> int:
        return int(np.argmax(self.prefill_logits(ids)))

    def step(self, token: int) -> int:
        return int(np.argmax(self.step_logits(token)))


def greedy(stepper: Stepper, prompt: list[int], new_tokens: int) -> list[int]:
    """``new_tokens`` greedy tokens after ``prompt``."""
    out = [stepper.prefill(prompt)]
    while len(out) < new_tokens:
        out.append(stepper.step(out[-1]))
    return out[:new_tokens]


class RuntimeBase:
    """A loaded artifact: ``tokenizer``, ``max_context``, ``logits(ids)``, ``nll(ids, n)``, ``stepper()``.

    Use it as a context manager so that what it holds is released however the caller leaves.
    ``steppers_share_state`` is True where every stepper of one runtime drives the same
    decoding context (llama.cpp): such a runtime runs one sequence at a time, so concurrent
    generations need one runtime each. Elsewhere steppers are independent and share the weights."""

    name = "runtime"
    steppers_share_state = False

    def logits(self, ids: Sequence[int]) -> np.ndarray:
        """(T, vocab) float32 logits for every position of ``ids``."""
        raise NotImplementedError

    def nll(self, ids: Sequence[int], n_score: int) -> list[float]:
        """Negative log-likelihoods (nats) of the last ``n_score`` tokens of ``ids``, each
        predicted from all tokens before it in ``ids``."""
        return nll_from_logits(self.logits(ids[:-1])[-n_score:], ids[-n_score:])

    def stepper(self) -> Stepper:
        raise NotImplementedError

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()
