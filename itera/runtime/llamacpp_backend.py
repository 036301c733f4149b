"""The llama.cpp backend (through llama-cpp-python) for ``.gguf`` files.

The KV cache is kept in F32 so that logits are comparable with the float source model; the
tokenizer is llama.cpp's own, from the GGUF file.
"""

from __future__ import annotations

import bisect
import contextlib
import io
import os
from pathlib import Path
from typing import Sequence

import numpy as np

from itera.errors import InputError
from itera.runtime.base import RuntimeBase, Stepper

GGML_TYPE_F32 = 0
MAX_CONTEXT = 32768  # the KV cache is sized for this at most, whatever the file declares


@contextlib.contextmanager
def native_log(name: str, directory: Path | None = None):
    """Send what native code writes to stderr (llama.cpp's logs) to ``$ITERA_HOME/logs/NAME-*.log``
    (or ``directory``) instead of the user's screen; yields the log's path."""
    import tempfile

    from itera.paths import itera_home, state_dir

    logs = state_dir(Path(directory) if directory is not None else itera_home() / "logs")
    fd, path = tempfile.mkstemp(prefix=f"{name}-", suffix=".log", dir=logs)
    saved = os.dup(2)
    try:
        os.dup2(fd, 2)
        yield Path(path)
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(fd)


def context_length(path: Path) -> int:
    """The training context a GGUF file declares (``<arch>.context_length``), read with gguf's reader
    before llama.cpp sizes a KV cache for it; refused unless it is a usable length."""
    from gguf import GGUFReader

    try:
        reader = GGUFReader(str(path))
        arch = str(bytes(reader.fields["general.architecture"].parts[-1]), "utf-8")
        field = reader.fields[f"{arch}.context_length"]
        ctx = int(field.parts[field.data[0]][0])
    except (KeyError, IndexError, ValueError, TypeError, OSError, UnicodeDecodeError):
        raise InputError(f"llama.cpp could not load {path}: it is not a GGUF model file (no readable "
                         "context_length); pass a GGUF file written by `itera export` or llama.cpp's tools") from None
    if ctx < 2:
        raise InputError(f"{path} declares a context of {ctx} token(s) (GGUF key {arch}.context_length); "
                         "at least 2 are needed")
    from itera.model.config import LIMITS

    if ctx > LIMITS["max_position_embeddings"]:
        raise InputError(f"{path} declares a context of {ctx} tokens (GGUF key {arch}.context_length), beyond any "
                         f"model itera supports (at most {LIMITS['max_position_embeddings']}); the file's header is "
                         "wrong: export the model again")
    return ctx


class LlamaCppTokenizer:
    """itera's tokenizer interface over the tokenizer embedded in a GGUF file."""

    def __init__(self, llm):
        self.llm = llm
        meta = llm.metadata
        self.bos_id = llm.token_bos() if llm.token_bos() >= 0 else None
        self.eos_id = llm.token_eos() if llm.token_eos() >= 0 else None
        self.add_bos = meta.get("tokenizer.ggml.add_bos_token", "false") == "true" and self.bos_id is not None
        self.vocab_size = llm.n_vocab()

    def encode(self, text: str, add_bos: bool | None = None) -> list[int]:
        ids = self.llm.tokenize(text.encode("utf-8"), add_bos=False, special=False)
        return ([self.bos_id] if (self.add_bos if add_bos is None else add_bos) else []) + ids

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """Ids and character offsets (from the byte length of each token's piece)."""
        ids = self.encode(text, add_bos=False)
        char_end_bytes = []  # byte offset at which each character ends
        total = 0
        for ch in text:
            total += len(ch.encode("utf-8"))
            char_end_bytes.append(total)
        offsets, pos = [], 0
        for t in ids:
            start = pos
            pos += len(self.llm.detokenize([t]))
            c0 = bisect.bisect_right(char_end_bytes, start)
            c1 = bisect.bisect_left(char_end_bytes, pos) + 1
            offsets.append((c0, min(c1, len(text))))
        return ids, offsets

    def decode(self, ids: list[int]) -> str:
        return self.llm.detokenize(ids).decode("utf-8", errors="replace")


class LlamaCppRuntime(RuntimeBase):
    name = "llama.cpp"
    steppers_share_state = True  # one llama.cpp context per runtime

    def __init__(self, path: Path, threads: int | None = None, n_ctx: int = 0):
        import llama_cpp

        from itera.runtime import llamacpp_mode

        train_ctx = context_length(path)
        self.mode = llamacpp_mode.mode()  # repacked weights or not: probed once per build and CPU
        # The KV cache and llama-cpp-python's all-position logits grow with n_ctx: callers that know
        # what they need (evaluate's window, a benchmark's prompt + generation) pass it.
        n_ctx = min(n_ctx or MAX_CONTEXT, train_ctx, MAX_CONTEXT)
        self.threads = threads or len(os.sched_getaffinity(0))  # the cores this process may use
        with contextlib.redirect_stderr(io.StringIO()), llamacpp_mode.model_params(self.mode["repack"]):
            try:
                self.llm = llama_cpp.Llama(str(path), n_ctx=n_ctx, logits_all=True, verbose=False,
                                           n_threads=self.threads, n_threads_batch=self.threads,
                                           type_k=GGML_TYPE_F32, type_v=GGML_TYPE_F32, n_batch=512)
            except ValueError:
                raise InputError(f"llama.cpp could not load {path}; pass a GGUF file written by `itera export` "
                                 "or llama.cpp's tools") from None
        llamacpp_mode.note_used(self.mode)
        self.tokenizer = LlamaCppTokenizer(self.llm)
        self.max_context = self.llm.n_ctx()

    def logits(self, ids: Sequence[int]) -> np.ndarray:
        """(T, vocab) float32 logits for every position of ``ids``."""
        self.llm.reset()
        self.llm.eval(list(ids))
        return np.array(self.llm.scores[: len(ids)], dtype=np.float32)

    def stepper(self) -> "LlamaCppStepper":
        return LlamaCppStepper(self)

    def close(self) -> None:
        self.llm.close()


def tokens_and_logits(path: Path, threads: int | None, text: str, ids: list[int]) -> tuple[list[int], np.ndarray, dict]:
    """llama.cpp's tokens for ``text`` (no BOS), its logits for ``ids``, and the mode it loaded in
    (for :func:`itera.runtime.isolate.call`: export verification runs this in a child)."""
    with LlamaCppRuntime(Path(path), threads=threads) as rt:
        return rt.tokenizer.encode(text, add_bos=False), rt.logits(ids), rt.mode


class LlamaCppStepper(Stepper):
    """The runtime's one llama.cpp context: a new stepper, or ``prefill``, starts it over."""

    def __init__(self, rt: LlamaCppRuntime):
        self.llm = rt.llm

    def _logits(self) -> np.ndarray:
        # a copy: llama.cpp overwrites its score rows on the next eval
        return np.array(self.llm.scores[self.llm.n_tokens - 1], dtype=np.float32)

    def prefill_logits(self, ids):
        self.llm.reset()
        self.llm.eval(list(ids))
        return self._logits()

    def step_logits(self, token):
        self.llm.eval([token])
        return self._logits()
