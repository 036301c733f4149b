"""What an artifact on disk is: the one table of artifact kinds (suffix, the bytes a file starts
with, the files that belong to it, the runtime that opens it), and what follows from it — a path's
format, the refusal of what is not an artifact, the record's artifact block and its digest, and
where ``org/name`` points in the local Hugging Face cache.

The runtime layer (:mod:`itera.runtime`), export, the registry and serve all read this table.
Adding an artifact kind is one row here (and, when itera runs it, a backend in
:data:`itera.runtime.RUNTIMES`). Nothing here imports torch, onnxruntime or llama_cpp.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from itera.errors import InputError
from itera.fsio import artifact_digest, check_regular


def kv_path(onnx_file: Path) -> Path:
    """The KV-cache graph that goes with an ONNX file: ``m.onnx`` -> ``m.kv.onnx``."""
    s = str(onnx_file)
    return Path(s[: -len(".onnx")] + ".kv.onnx") if s.endswith(".onnx") else Path(s + ".kv.onnx")


def _onnx_companions(path: Path) -> list[Path]:
    """An ONNX graph's KV-cache graph and the external data of both."""
    kv = kv_path(path)
    return [kv, path.with_name(path.name + ".data"), kv.with_name(kv.name + ".data")]


@dataclass(frozen=True)
class ArtifactKind:
    """One kind of artifact file itera writes or reads."""

    format: str  # the record's artifact format
    suffix: str  # lower case, with the dot
    runtime: str | None  # the runtime that opens it (itera.runtime.RUNTIMES), None: not run by itera
    magic: bytes | None = None  # what every such file starts with
    companions: Callable[[Path], list[Path]] = field(default=lambda path: [])  # files that may go with it


KINDS = (
    ArtifactKind("gguf", ".gguf", "llama.cpp", magic=b"GGUF"),
    ArtifactKind("onnx", ".onnx", "onnxruntime", companions=_onnx_companions),
    ArtifactKind("pt2", ".pt2", None, magic=b"PK"),  # torch.export and TorchScript files are zips
    ArtifactKind("torchscript", ".pt", None, magic=b"PK"),
)
BY_SUFFIX = {k.suffix: k for k in KINDS}
FILE_FORMATS = {k.suffix: k.format for k in KINDS}
CHECKPOINT_RUNTIME = "torch"  # a checkpoint directory (float or itera-quantized)
RUNNABLE = ("checkpoint", *(k.format for k in KINDS if k.runtime))


def artifact_format(path: Path) -> str:
    """checkpoint, gguf, onnx, pt2, torchscript, or unknown, from the path alone."""
    path = Path(path)
    if path.is_dir():
        return "checkpoint"
    return FILE_FORMATS.get(path.suffix.lower(), "unknown")


def runtime_of(fmt: str) -> str:
    """The runtime that opens an artifact of format ``fmt``: a kind's own, else torch (a checkpoint,
    and what no runtime opens: torch's loader is the one that refuses it)."""
    return next((k.runtime for k in KINDS if k.format == fmt and k.runtime), CHECKPOINT_RUNTIME)


def check_model_path(path: Path) -> str:
    """Validate that ``path`` is an artifact some backend can run; return its format."""
    from itera.model.checkpoint import PICKLE_SUFFIXES, check_checkpoint_dir

    path = Path(path)
    if not path.exists() and not path.is_symlink():
        raise InputError(f"{path} does not exist; pass a checkpoint directory, .gguf or .onnx file")
    check_regular(path, "model")
    fmt = artifact_format(path)
    if fmt == "checkpoint" or path.suffix.lower() in PICKLE_SUFFIXES:
        check_checkpoint_dir(path)
        return "checkpoint"
    if fmt in RUNNABLE:
        if not path.is_file():
            raise InputError(f"{path} is not a file; pass a .{fmt} file")
        return fmt
    if fmt in ("pt2", "torchscript"):
        raise InputError(f"{path} is a {'torch.export program' if fmt == 'pt2' else 'TorchScript module'} for "
                         "PyTorch deployments; itera runs checkpoints, .gguf and .onnx files, so pass the checkpoint "
                         "it was exported from")
    raise InputError(f"{path} is not a checkpoint directory, .gguf or .onnx file; pass one of those")


def detect(path: Path) -> tuple[str, str]:
    """(kind, format) of an artifact for the record: a checkpoint directory (safetensors or
    itera-quant), a PEFT adapter directory, or a file by its suffix."""
    path = Path(path)
    if path.is_dir():
        if (path / "config.json").is_file():
            from itera.model.checkpoint import checkpoint_format

            return "checkpoint", checkpoint_format(path)
        if (path / "adapter_config.json").is_file():
            return "adapter", "peft-lora"
        return "checkpoint", "directory"
    return "file", FILE_FORMATS.get(path.suffix.lower(), path.suffix[1:].lower() or "file")


ARTIFACT_KINDS = ("a checkpoint directory, a PEFT adapter directory, or a .gguf, .onnx, .pt2 or TorchScript "
                  ".pt file")


def check_artifact(path: Path) -> Path:
    """``path`` is an artifact itera can read: refuse anything else (``/etc/shadow``, a FIFO,
    ``/proc/self``) with one line, before it is hashed or stored."""
    from itera.model.checkpoint import load_checked_config

    path = Path(path)
    check_regular(path)
    if path.is_dir():
        if (path / "config.json").is_file():
            load_checked_config(path)
            return path
        if (path / "adapter_config.json").is_file() and (path / "adapter_model.safetensors").is_file():
            return path
        raise InputError(f"{path} is a directory but not an artifact itera can read ({ARTIFACT_KINDS})")
    suffix = path.suffix.lower()
    if suffix not in BY_SUFFIX:
        raise InputError(f"{path} is not an artifact itera can read; pass {ARTIFACT_KINDS}")
    with open(path, "rb") as f:
        head = f.read(4)
    magic = BY_SUFFIX[suffix].magic
    if magic is not None and not head.startswith(magic):
        raise InputError(f"{path} does not start like a {suffix} file; pass a file written by `itera export`")
    if not head:
        raise InputError(f"{path} is empty; pass a file written by `itera export`")
    return path


def companions(path: Path) -> list[Path]:
    """Files that belong to an artifact file and exist: an ONNX graph's KV-cache graph and external data."""
    path = Path(path)
    kind = BY_SUFFIX.get(path.suffix.lower())
    if kind is None or not path.is_file():
        return []
    return [p for p in kind.companions(path) if p != path and p.is_file()]


def describe_artifact(path: Path, kind: str, fmt: str, companions: list[Path] = ()) -> dict:
    """The record's ``artifact`` block for an existing file or directory (with the files that
    belong to it: bytes and sha256 cover them, and they are listed)."""
    size, digest = artifact_digest(Path(path), companions)
    # absolute, so the next command finds it from any directory; what was typed stays in params
    art = {"path": os.path.abspath(path), "kind": kind, "format": fmt, "bytes": size, "sha256": digest}
    if companions:
        art["files"] = [os.path.abspath(path), *(os.path.abspath(c) for c in companions)]
    return art


def describe(path: Path) -> dict:
    """The record's artifact block of an existing artifact: path, kind, format, bytes, sha256
    (over its companion files too)."""
    return describe_artifact(path, *detect(path), companions=companions(path))


def digest(path: Path) -> tuple[int, str]:
    """(bytes, sha256) of an artifact as :func:`describe` computes them."""
    return artifact_digest(Path(path), companions(path))


HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9_.-]+")


def hub_cache() -> Path:
    """huggingface_hub's cache: $HF_HUB_CACHE, else $HF_HOME/hub, else ~/.cache/huggingface/hub."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    return Path(os.environ.get("HF_HOME") or Path.home() / ".cache" / "huggingface") / "hub"


def resolve_model(path: Path) -> Path:
    """A model path as given, or for ``org/name`` that is not a local path, the snapshot of that
    repository in the local Hugging Face cache (``refs/main``, else the only snapshot). Never
    touches the network: a repository that is not cached is an error saying how to get it."""
    path = Path(path)
    text = str(path)
    if path.exists() or path.is_symlink() or not HUB_ID.fullmatch(text):
        return path
    repo = hub_cache() / ("models--" + text.replace("/", "--"))
    snapshots = repo / "snapshots"
    ref = repo / "refs" / "main"
    if ref.is_file():
        snap = snapshots / ref.read_text().strip()
        if snap.is_dir():
            return snap
    found = sorted(snapshots.iterdir()) if snapshots.is_dir() else []
    if len(found) == 1:
        return found[0]
    raise InputError(f"{text} is neither a local path nor a model in the Hugging Face cache ({hub_cache()}); "
                     f"download it with `huggingface-cli download {text}` or pass a checkpoint directory")
