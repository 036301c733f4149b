"""The models a server holds and how it changes them.

- :class:`Source` — what to serve: an artifact, its sha256 and, for a registry ref, its version.
  :func:`resolve_source` turns ``--model`` into one; a registry version's bytes are checked
  against the registry's sha256 before anything is loaded (:func:`verify`).
- :class:`LoadedModel` — one version in memory, with *lanes*: one stepper (one KV cache) per
  concurrent generation. llama.cpp drives one sequence per context, so each lane there is a
  runtime of its own (the weights are memory-mapped once by the OS); torch and onnxruntime lanes
  share one runtime's weights.
- :class:`ModelPool` — the current model, reference-counted: a request checks a model out and
  runs to the end on it; a swap points new requests at the new model, and the old one is closed
  when its last request finishes.
- :class:`Watcher` — a thread that looks at the registry alias every ``poll_interval`` seconds;
  when it moves (promote, rollback), the new version is verified, loaded, verified again (so the
  file cannot change while it loads unnoticed) and swapped in. A version that fails any step
  leaves the old one serving; why is logged and kept for ``/health``.
- :class:`Admission` — at most ``slots`` generations at once and ``max_queue`` waiting, FIFO;
  beyond that, a request is refused at once (429) rather than left to time out.
"""

from __future__ import annotations

import asyncio
import collections
import json
import os
import queue
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from itera.artifacts import check_model_path
from itera.artifacts import digest as artifact_digest
from itera.errors import InputError, IteraError


@dataclass(frozen=True)
class Source:
    """An artifact to serve. ``name`` is the model id clients see; ``version`` is None for a path."""

    path: Path
    format: str  # checkpoint, gguf or onnx
    name: str
    version: int | None
    sha256: str
    bytes: int
    kind: str  # the record's artifact kind: checkpoint or file

    @property
    def label(self) -> str:
        return f"{self.name}@{self.version}" if self.version is not None else self.name

    def artifact(self) -> dict:
        return {"path": str(self.path), "kind": self.kind, "format": self.format, "bytes": self.bytes,
                "sha256": self.sha256}


class SwapRefused(IteraError):
    """A registry version that may not be served (missing, changed since registered, unloadable).
    ``public`` says why without naming paths, for the unauthenticated ``/health``."""

    def __init__(self, message: str, public: str):
        super().__init__(message)
        self.public = public


def verify(row: dict) -> Source:
    """The registry row as a :class:`Source`, after checking that its artifact is the one registered
    (hashed as the registry hashes it: an ONNX graph with its KV graph and external data)."""
    path = Path(row["path"])
    label = f"{row['name']}@{row['version']}"
    if not path.exists():
        raise SwapRefused(f"{label}: its artifact {path} no longer exists", "its artifact no longer exists")
    try:
        fmt = check_model_path(path)
        size, digest = artifact_digest(path)  # as the registry hashed it: an ONNX graph with its companions
    except InputError as e:
        raise SwapRefused(f"{label}: {e}", "its artifact is not a model itera can run") from None
    if digest != row["sha256"]:
        why = f"changed since it was registered (sha256 {digest[:12]}…, registered {row['sha256'][:12]}…)"
        raise SwapRefused(f"{label}: {path} {why}; not loaded", f"its artifact {why}")
    return Source(path, fmt, row["name"], int(row["version"]), digest, size, "checkpoint" if path.is_dir() else "file")


def resolve_source(spec: str, registry: Path | None) -> tuple[Source, "RegistryRef | None"]:
    """``--model`` as a Source, and the ref to follow (None for a path or a pinned ``NAME@N``)."""
    if "@" not in spec:
        path = Path(spec)
        fmt = check_model_path(path)
        size, digest = artifact_digest(path)
        name = path.name if fmt == "checkpoint" else path.name[: -len(path.suffix)]
        return Source(path.resolve(), fmt, name or "model", None, digest, size,
                      "checkpoint" if path.is_dir() else "file"), None
    from itera.registry import VERSION_RE, Ref, Registry
    from itera.registry.storage import default_path, sqlite_path

    ref = Ref.parse(spec)
    location = registry if registry is not None else default_path()
    reg_path = sqlite_path(location)
    if reg_path is not None and not reg_path.is_file():
        raise InputError(f"registry {reg_path} does not exist; pass --registry FILE (or ITERA_REGISTRY), or register "
                         "the model with `itera registry register` first")
    with Registry(location, create=False) as reg:
        row = reg.local(reg.get(ref))  # a stored version: fetched into the local cache, every byte checked
    try:
        source = verify(row)
    except SwapRefused as e:
        raise InputError(f"{spec} cannot be served: {e}") from None
    follow = None if (ref.selector and VERSION_RE.fullmatch(ref.selector)) else RegistryRef(location, ref)
    return source, follow


@dataclass(frozen=True)
class RegistryRef:
    path: Path | str = field(repr=False)  # a SQLite file, or a PostgreSQL URL (with its password: print shown)
    ref: object  # itera.registry.Ref

    @property
    def shown(self) -> str:
        from itera import pg

        return pg.mask(str(self.path))


def _eos_ids(runtime, source: Source) -> frozenset:
    """Tokens that end a generation: the tokenizer's EOS, plus for a checkpoint the ids in
    ``generation_config.json``, and for GGUF every token llama.cpp marks end-of-generation."""
    ids = ({runtime.tokenizer.eos_id} | set(getattr(runtime.tokenizer, "stop_ids", ()) or ())) - {None}
    if source.format == "checkpoint":
        gen = source.path / "generation_config.json"
        if gen.is_file():
            try:
                v = json.loads(gen.read_text("utf-8")).get("eos_token_id")
            except ValueError:
                v = None
            ids |= {i for i in (v if isinstance(v, list) else [v]) if isinstance(i, int) and not isinstance(i, bool)}
    elif source.format == "gguf":
        import llama_cpp

        vocab = runtime.llm._model.vocab
        ids |= {t for t in range(runtime.llm.n_vocab()) if llama_cpp.llama_vocab_is_eog(vocab, t)}
    return frozenset(ids)


class LoadedModel:
    """One version in memory with ``lanes`` steppers, its tokenizer, context, end tokens and chat template."""

    def __init__(self, source: Source, lanes: int, threads: int | None, lane_threads: int,
                 chat_template: str | None = None):
        from itera.runtime import open_runtime
        from itera.chat import ChatTemplate, model_template, token_text
        from itera.tokenizer import fingerprint

        self.source = source
        self.runtimes: list = []
        self.in_flight = 0
        self.retired = False
        self.closed = False
        try:
            first = open_runtime(source.path, threads=lane_threads if source.format == "gguf" else threads)
            self.runtimes.append(first)
            if first.steppers_share_state:
                # one llama.cpp context per lane, each on its share of the cores for prompts as for
                # single tokens (the runtime sets both): ggml's spinning barrier punishes oversubscription
                self.runtimes += [open_runtime(source.path, threads=lane_threads) for _ in range(lanes - 1)]
                steppers = [rt.stepper() for rt in self.runtimes]
            else:
                steppers = [first.stepper() for _ in range(lanes)]
            self.runtime_name = first.name
            self.tokenizer = first.tokenizer
            self.tokenizer_fingerprint = fingerprint(first.tokenizer)
            self.max_context = int(first.max_context)
            self.eos_ids = _eos_ids(first, source)
            text, origin = (chat_template, "--chat-template") if chat_template else \
                (model_template(first, source.path, source.format), source.label)
            self.chat = ChatTemplate(text, token_text(self.tokenizer, self.tokenizer.bos_id),
                                     token_text(self.tokenizer, self.tokenizer.eos_id), origin) if text else None
        except BaseException:
            self.close()
            raise
        self._lanes: queue.SimpleQueue = queue.SimpleQueue()
        for s in steppers:
            self._lanes.put(s)

    def take_lane(self):
        return self._lanes.get_nowait()  # admission keeps in-flight requests <= lanes

    def give_lane(self, stepper) -> None:
        self._lanes.put(stepper)

    def describe(self) -> dict:
        s = self.source
        return {"id": s.name, "version": s.version, "sha256": s.sha256, "format": s.format,
                "runtime": self.runtime_name, "max_context": self.max_context, "chat_template": self.chat is not None}

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        for rt in self.runtimes:
            try:
                rt.close()
            except Exception:  # noqa: BLE001 - closing is best effort; the process may be exiting
                pass


class ModelPool:
    """The current model and the ones still finishing requests."""

    def __init__(self, model: LoadedModel):
        self.current = model
        self._lock = threading.Lock()
        self.served: list[dict] = [self._entry(model)]

    @staticmethod
    def _entry(model: LoadedModel) -> dict:
        return {"version": model.source.version, "sha256": model.source.sha256, "path": str(model.source.path),
                "since": time.time(), "requests": 0}

    def checkout(self) -> LoadedModel:
        with self._lock:
            m = self.current
            m.in_flight += 1
            for e in self.served:
                if e["sha256"] == m.source.sha256 and e["version"] == m.source.version:
                    e["requests"] += 1
            return m

    def release(self, m: LoadedModel) -> None:
        with self._lock:
            m.in_flight -= 1
            done = m.retired and m.in_flight == 0
        if done:
            m.close()

    def swap(self, new: LoadedModel) -> LoadedModel:
        with self._lock:
            old, self.current = self.current, new
            old.retired = True
            done = old.in_flight == 0
            if not any(e["sha256"] == new.source.sha256 and e["version"] == new.source.version for e in self.served):
                self.served.append(self._entry(new))
        if done:
            old.close()
        return old

    def close(self) -> None:
        with self._lock:
            self.current.close()


class Watcher:
    """Follows a registry alias and swaps the pool's model when it moves."""

    def __init__(self, follow: RegistryRef, pool: ModelPool, load: Callable[[Source], LoadedModel],
                 interval: float, log: Callable[[str], None], on_result: Callable[[bool], None] = lambda ok: None):
        self.follow, self.pool, self.load, self.interval, self.log = follow, pool, load, interval, log
        self.on_result = on_result
        self.swaps: list[dict] = []
        self.refused: list[dict] = []
        self._tried: dict = {}  # (version, sha256, file stat) -> reason, so a bad version is not retried every poll
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="itera-registry-watcher", daemon=True)
        self._registry = None
        self._registry_id: tuple[int, int] | None = None  # (device, inode) of the file the connection reads
        self._registry_error: str | None = None

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)

    def _run(self) -> None:
        try:
            while not self._stop.wait(self.interval):
                self.poll()
        finally:
            if self._registry is not None:
                self._registry.close()

    def _target(self) -> dict | None:
        from itera.registry import Ref, Registry

        from itera.registry.storage import sqlite_path

        # The open connection would go on reading a registry file that was deleted or replaced:
        # look at the path itself each time (a missing one is said once in the log, by poll). A
        # PostgreSQL connection is kept; one that broke (the server restarted) is opened anew.
        local = sqlite_path(self.follow.path)
        ident = None
        if local is not None:
            st = os.stat(local)
            ident = (st.st_dev, st.st_ino)
        if self._registry is not None and ident != self._registry_id:
            self._registry.close()
            self._registry = None
        if self._registry is None:
            self._registry = Registry(self.follow.path, create=False)
            self._registry_id = ident
        reg, ref = self._registry, self.follow.ref
        try:
            v = reg.resolve_version(ref)
            return reg.get(Ref(ref.name, str(v)))
        except IteraError:
            if local is None:  # reconnect at the next poll
                self._registry.close()
                self._registry = None
            raise

    def poll(self) -> None:
        """One look at the alias; loads and swaps when it moved."""
        try:
            row = self._target()
            self._registry_error = None
        except (IteraError, OSError) as e:
            if str(e) != self._registry_error:  # say it once, not every poll
                self.log(f"serve: cannot read {self.follow.ref} from {self.follow.shown}: {e}; still serving "
                         f"{self.pool.current.source.label}")
                self._registry_error = str(e)
            return
        cur = self.pool.current.source
        if row["version"] == cur.version and row["sha256"] == cur.sha256:
            return
        if row.get("store"):  # tried once: a bad blob is not copied and hashed again every poll
            key = (row["version"], row["sha256"], row["store"], None)
        else:
            try:
                st = os.stat(row["path"])
                key = (row["version"], row["sha256"], st.st_size, st.st_mtime_ns)
            except OSError:
                key = (row["version"], row["sha256"], None, None)
        if key in self._tried:
            return
        label = f"{row['name']}@{row['version']}"
        t0 = time.perf_counter()
        try:
            # a version promoted elsewhere and kept in a store: fetched (every blob checked) first
            row = self._registry.local(row) if row.get("store") else row
            source = verify(row)
            new = self.load(source)
            try:
                verify(row)  # the bytes that were loaded are still the registered ones
            except SwapRefused:
                new.close()
                raise
        except Exception as e:  # noqa: BLE001 - any failure to load keeps the old model serving
            reason = str(e) if isinstance(e, IteraError) else f"{type(e).__name__}: {e}"
            public = e.public if isinstance(e, SwapRefused) else f"it did not load ({type(e).__name__})"
            self._tried[key] = reason
            self.refused.append({"version": row["version"], "sha256": row["sha256"], "reason": public,
                                 "at": time.time()})
            self.log(f"serve: {label} not loaded, still serving {cur.label}: {reason}")
            self.on_result(False)
            return
        self.pool.swap(new)
        self.swaps.append({"from": cur.version, "to": row["version"], "sha256": row["sha256"],
                           "load_s": round(time.perf_counter() - t0, 3), "at": time.time()})
        self.on_result(True)
        self.log(f"serve: now serving {label} ({source.format}, sha256 {source.sha256[:12]}…; was {cur.label}); "
                 f"requests in flight finish on {cur.label}")


class Overloaded(Exception):
    """Every slot is busy and the queue is full (429)."""


class Unavailable(Exception):
    """The server is shutting down (503)."""


@dataclass
class Admission:
    """``slots`` generations at once, ``max_queue`` waiting in order; used on the event loop only."""

    slots: int
    max_queue: int
    running: int = 0
    draining: bool = False
    waiting: collections.deque = field(default_factory=collections.deque)

    @property
    def queued(self) -> int:
        return len(self.waiting)

    async def acquire(self) -> None:
        if self.draining:
            raise Unavailable()
        if self.running < self.slots and not self.waiting:
            self.running += 1
            return
        if len(self.waiting) >= self.max_queue:
            raise Overloaded()
        fut = asyncio.get_running_loop().create_future()
        self.waiting.append(fut)
        try:
            await fut  # release() hands its slot over by resolving this
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled():
                self.release()  # the slot arrived as the client left: pass it on
            else:
                self.waiting.remove(fut)
            raise

    def release(self) -> None:
        while self.waiting:
            fut = self.waiting.popleft()
            if not fut.done():
                fut.set_result(None)  # running stays the same: the slot changes hands
                return
        self.running -= 1
