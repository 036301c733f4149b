"""Runtime backends behind one interface (:class:`itera.runtime.base.RuntimeBase`): give token
ids, get logits, next-token NLLs and a KV-cache stepper.

- torch: checkpoint directories (float or itera-quantized), :mod:`itera.runtime.torch_backend`;
- llama.cpp: ``.gguf`` files, :mod:`itera.runtime.llamacpp_backend`;
- onnxruntime: ``.onnx`` files, :mod:`itera.runtime.onnx_backend`.

This package also owns what an artifact on disk is (:func:`detect`, :func:`describe`). Nothing
here imports torch, onnxruntime or llama_cpp until a runtime is opened.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from itera.errors import InputError
from itera.model.checkpoint import PICKLE_SUFFIXES, check_checkpoint_dir, checkpoint_format
from itera.runtime.base import RuntimeBase

RUNNABLE = ("checkpoint", "gguf", "onnx")
FILE_FORMATS = {".gguf": "gguf", ".onnx": "onnx", ".pt2": "pt2", ".pt": "torchscript"}


def artifact_format(path: Path) -> str:
    """checkpoint, gguf, onnx, pt2, or unknown, from the path alone."""
    path = Path(path)
    if path.is_dir():
        return "checkpoint"
    return FILE_FORMATS.get(path.suffix.lower(), "unknown")


def check_model_path(path: Path) -> str:
    """Validate that ``path`` is an artifact some backend can run; return its format."""
    from itera.fsio import check_regular

    path = Path(path)
    if not path.exists() and not path.is_symlink():
        raise InputError(f"{path} does not exist; pass a checkpoint directory, .gguf or .onnx file")
    check_regular(path, "model")
    fmt = artifact_format(path)
    if fmt == "checkpoint" or path.suffix.lower() in PICKLE_SUFFIXES:
        check_checkpoint_dir(path)
        return "checkpoint"
    if fmt in ("gguf", "onnx"):
        if not path.is_file():
            raise InputError(f"{path} is not a file; pass a .{fmt} file")
        return fmt
    if path.suffix.lower() in (".pt2", ".pt"):
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
            return "checkpoint", checkpoint_format(path)
        if (path / "adapter_config.json").is_file():
            return "adapter", "peft-lora"
        return "checkpoint", "directory"
    return "file", FILE_FORMATS.get(path.suffix.lower(), path.suffix[1:].lower() or "file")


ARTIFACT_KINDS = ("a checkpoint directory, a PEFT adapter directory, or a .gguf, .onnx, .pt2 or TorchScript "
                  ".pt file")
_MAGIC = {".gguf": b"GGUF", ".pt2": b"PK", ".pt": b"PK"}  # GGUF header; torch.export and TorchScript are zips


def check_artifact(path: Path) -> Path:
    """``path`` is an artifact itera can read: refuse anything else (``/etc/shadow``, a FIFO,
    ``/proc/self``) with one line, before it is hashed or stored."""
    from itera.fsio import check_regular
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
    if suffix not in (".gguf", ".onnx", ".pt2", ".pt"):
        raise InputError(f"{path} is not an artifact itera can read; pass {ARTIFACT_KINDS}")
    with open(path, "rb") as f:
        head = f.read(4)
    if suffix in _MAGIC and not head.startswith(_MAGIC[suffix]):
        raise InputError(f"{path} does not start like a {suffix} file; pass a file written by `itera export`")
    if not head:
        raise InputError(f"{path} is empty; pass a file written by `itera export`")
    return path


def companions(path: Path) -> list[Path]:
    """Files that belong to an artifact file: an ONNX graph's KV-cache graph and external data."""
    from itera.runtime.onnx_backend import kv_path

    path = Path(path)
    if path.suffix.lower() != ".onnx" or not path.is_file():
        return []
    kv = kv_path(path)
    candidates = [kv, path.with_name(path.name + ".data"), kv.with_name(kv.name + ".data")]
    return [p for p in candidates if p != path and p.is_file()]


def describe(path: Path) -> dict:
    """The record's artifact block of an existing artifact: path, kind, format, bytes, sha256
    (over its companion files too)."""
    from itera.record import describe_artifact

    return describe_artifact(path, *detect(path), companions=companions(path))


def digest(path: Path) -> tuple[int, str]:
    """(bytes, sha256) of an artifact as :func:`describe` computes them."""
    from itera.fsio import artifact_digest

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


def resolve_device(device: str) -> str:
    """'auto' becomes cuda when torch sees a GPU, else cpu. Imports torch, so call it late."""
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def open_runtime(path: Path, dtype: str = "float32", device: str = "cpu", threads: int | None = None,
                 n_ctx: int = 0) -> RuntimeBase:
    """The backend for ``path``: torch for a checkpoint directory, llama.cpp for .gguf,
    onnxruntime for .onnx. Use it as a context manager (``with open_runtime(p) as rt:``).
    ``n_ctx``: the most tokens the caller will run at once (llama.cpp sizes its buffers for it;
    0: the file's context, at most 32768)."""
    fmt = check_model_path(path)
    if fmt == "gguf":
        from itera.runtime.llamacpp_backend import LlamaCppRuntime

        return LlamaCppRuntime(Path(path), threads=threads, n_ctx=n_ctx)
    if fmt == "onnx":
        from itera.runtime.onnx_backend import OnnxRuntime

        return OnnxRuntime(Path(path), threads=threads)
    from itera.runtime.torch_backend import TorchRuntime

    return TorchRuntime.load(Path(path), dtype=dtype, device=device, threads=threads)
