"""``itera evaluate``: score a checkpoint, GGUF or ONNX file on one or more texts with the scoring
protocol of :mod:`itera.scoring` (perplexity and bits per byte, sliding window)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from itera.errors import UsageError
from itera.options import flag, nested
from itera.progress import SILENT, Reporter
from itera.record import Outcome
from itera.scoring import EvalOptions, evaluate_text, resolve_bos


@dataclass
class EvaluateOptions:
    """What ``itera evaluate`` was asked: a model, datasets, and the scoring protocol."""

    model: Path = flag("--model")  # the CLI's default: the artifact of the record on stdin
    datasets: list[str] = flag("--dataset")
    protocol: EvalOptions = nested(default_factory=EvalOptions)
    dtype: str = flag("--dtype", default="float32")
    device: str = flag("--device", default="cpu", cli_default="auto",
                       why="the job resolves auto (cuda when available); a library caller gets the cpu unless it asks")
    threads: int | None = flag("--threads", default=None)
    text_field: str = flag("--text-field", default="text")

    def inputs(self) -> list[Path]:
        from itera.data import local_path

        return [self.model, *(p for p in map(local_path, self.datasets) if p is not None)]

    def outputs(self) -> list:
        return []

    def validate(self) -> "EvaluateOptions":
        self.protocol.validate()
        if not self.datasets:
            raise UsageError("pass at least one --dataset")
        if self.threads is not None and self.threads < 1:
            raise UsageError(f"--threads must be at least 1 (got {self.threads})")
        return self


def run_evaluate(opts: EvaluateOptions, reporter: Reporter = SILENT) -> Outcome:
    """Cheap checks of the model, then the data, then the expensive load; score every dataset.

    Figures are keyed by :func:`itera.data.dataset_key` (a file by its name and a content hash,
    a built-in or hub name as written); what was typed, and each file's absolute path, are kept
    in params."""
    from itera.data import canonical, dataset_key, load_text, local_path
    from itera.model.checkpoint import load_checked_config
    from itera.artifacts import check_model_path, describe
    from itera.runtime import open_runtime, resolve_device

    opts.validate()
    fmt = check_model_path(opts.model)
    if fmt == "checkpoint":
        opts.protocol.resolve(load_checked_config(opts.model)[0].max_position_embeddings)
        opts.device = resolve_device(opts.device)
    else:
        if opts.dtype != "float32":
            raise UsageError(f"--dtype {opts.dtype} applies to checkpoints run in torch; a .{fmt} file runs in "
                             "the types it was exported with (drop --dtype)")
        if opts.device not in ("cpu", "auto"):
            raise UsageError(f"--device {opts.device} applies to checkpoints run in torch; itera runs .{fmt} files "
                             "on the CPU (drop --device)")
        opts.device = "cpu"
    typed, sources, where = {}, {}, {}
    for spec in opts.datasets:  # a file is read (and checked) before its bytes name it
        key = canonical(spec) if local_path(spec) is None else None
        if key in sources:
            continue
        src = load_text(spec, purpose="eval", field=opts.text_field)
        if key is None:
            key = dataset_key(spec)
            where.setdefault(key, os.path.realpath(local_path(spec)))
        if key not in sources:
            typed[key], sources[key] = spec, src
    results, protocol = {}, None
    if fmt == "gguf":  # llama.cpp's buffers are sized for the window, not for what the file declares
        from itera.runtime.llamacpp_backend import context_length

        protocol = opts.protocol.resolve(context_length(opts.model))
    with open_runtime(opts.model, dtype=opts.dtype, device=opts.device, threads=opts.threads,
                      n_ctx=protocol.window if protocol else 0) as rt:
        protocol = protocol or opts.protocol.resolve(rt.max_context)
        used_bos = resolve_bos(rt.tokenizer, protocol)
        for key, src in sources.items():
            task = reporter.task(f"evaluate {typed[key]}", unit="windows")
            try:
                results[key] = evaluate_text(rt, src.text, protocol, source=typed[key],
                                             progress=lambda done, total, t=task: t.update(done))
            finally:
                task.close()
        runtime = rt.name
        threads = _threads_used(rt, opts.threads)
    params = {**protocol.as_params(), "bos": used_bos, "model": str(opts.model), "runtime": runtime,
              "dtype": opts.dtype if fmt == "checkpoint" else None, "device": opts.device, "threads": threads,
              "datasets": {key: src.description for key, src in sources.items()},
              "datasets_typed": {key: typed[key] for key in sources},
              "datasets_paths": {key: where[key] for key in sources if key in where}}
    return Outcome(describe(opts.model), {"datasets": results}, params, device=opts.device)


def _threads_used(rt, asked: int | None) -> int:
    """The CPU threads the runtime computed with (its default when none were asked for)."""
    if asked:
        return asked
    if rt.name == "torch":
        import torch

        return torch.get_num_threads()
    return getattr(rt, "threads", None) or len(os.sched_getaffinity(0))
