"""The training loop shared by ``distill`` and ``dpo-train``.

- AdamW, linear warm-up then cosine decay, gradient accumulation, gradient clipping.
- Deterministic on CPU: the batch of step ``s`` is a pure function of ``(seed, s)``, so a run
  resumed from a checkpoint at step ``k`` sees exactly the batches the uninterrupted run saw.
- Resumable: every ``save_every`` steps the model, optimizer and step go to ``state_dir``
  (written to a temporary file, then renamed), and ``resume=True`` continues from there.
- ``extra``: a module a loss learns alongside the model (distillation's hidden-state projection)
  is optimised, clipped, all-reduced and checkpointed with it, but is never part of the model.
- Distributed: under ``torchrun`` the model is wrapped in DistributedDataParallel (gloo on CPU,
  nccl on GPU); each rank takes its share of every global batch's rows, so N processes with
  the same global batch compute the same update as one.
- Precision: ``dtype`` "auto" is bf16 autocast on CUDA and float32 on the CPU; "bf16" or
  "float32" choose (bf16 on the CPU autocasts there too, which is slower on most CPUs).
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch

from itera.errors import CheckpointError, DataError, IteraError, UsageError
from itera.options import flag, internal



def _inode(path: Path) -> int | None:
    try:
        return path.stat().st_ino
    except FileNotFoundError:
        return None

class Interrupted(IteraError):
    """Ctrl-C (SIGINT) during a run: exit 130, with what was kept and how to go on. Unlike other
    errors the message may hold a second line (the command to resume), kept as written."""

    exit_code = 130

    def __init__(self, message: str):
        Exception.__init__(self, "\n".join(" ".join(line.split()) for line in str(message).splitlines()
                                            if line.strip()))


@dataclass
class TrainOptions:
    """The training loop's settings, shared by ``itera distill`` and ``itera dpo-train``; each
    command builds them with its own defaults (see their ``train`` fields)."""

    steps: int = flag("--steps", default=300)
    # sequences per optimizer step, over all processes and micro-batches
    batch_size: int = flag("--batch-size", default=16)
    grad_accum: int = flag("--grad-accum", default=1)  # micro-batches per step on each process
    seq_len: int = flag("--seq-len", default=128)
    lr: float = flag("--lr", default=3e-3)
    # cosine decays to lr * min_lr_ratio
    min_lr_ratio: float = internal("the floor of the cosine schedule, a fixed part of the recipe", default=0.1)
    warmup_steps: int = flag("--warmup-steps", default=20)
    weight_decay: float = flag("--weight-decay", default=0.1)
    grad_clip: float = flag("--grad-clip", default=1.0)
    seed: int = flag("--seed", default=0)
    eval_every: int = flag("--eval-every", default=0)  # steps between held-out evaluations (0: only at the end)
    save_every: int = flag("--save-every", default=0)  # steps between resumable checkpoints (0: none)
    # auto | float32 | bf16: the compute precision of the forward and backward passes
    dtype: str = flag("--dtype", default="auto")

    def validate(self, world_size: int = 1) -> "TrainOptions":
        for name in ("steps", "batch_size", "grad_accum", "seq_len"):
            if getattr(self, name) < 1:
                raise UsageError(f"--{name.replace('_', '-')} must be at least 1 (got {getattr(self, name)})")
        if not self.lr > 0:
            raise UsageError(f"--lr must be positive (got {self.lr})")
        if self.warmup_steps < 0 or self.eval_every < 0 or self.save_every < 0:
            raise UsageError("--warmup-steps, --eval-every and --save-every must not be negative")
        if self.dtype not in ("auto", "float32", "fp32", "bf16", "bfloat16"):
            raise UsageError(f"--dtype {self.dtype!r} is not a training precision; use auto, float32 or bf16")
        if self.batch_size % (world_size * self.grad_accum):
            raise UsageError(f"--batch-size {self.batch_size} must be divisible by processes x --grad-accum "
                             f"({world_size} x {self.grad_accum})")
        return self

    def as_params(self) -> dict:
        return asdict(self)


def lr_at(step: int, opts: TrainOptions) -> float:
    """Linear warm-up to ``lr`` then cosine decay to ``lr * min_lr_ratio`` at the last step."""
    if step < opts.warmup_steps:
        return opts.lr * (step + 1) / opts.warmup_steps
    span = max(1, opts.steps - opts.warmup_steps)
    progress = min(1.0, (step - opts.warmup_steps) / span)
    return opts.lr * (opts.min_lr_ratio + (1 - opts.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


CALIBRATION_STREAM = -1  # the step number no training step uses: calibration draws its own windows


def step_generator(seed: int, step: int) -> torch.Generator:
    """The random stream of one step: a pure function of ``(seed, step)``, shared by every
    recipe so that a resumed or distributed run draws exactly what the uninterrupted one did."""
    return torch.Generator().manual_seed(seed * 1_000_003 + step)


def sample_windows(ids: torch.Tensor, count: int, length: int, gen: torch.Generator) -> torch.Tensor:
    """``count`` windows of ``length`` consecutive tokens of ``ids`` at random offsets: (count, length)."""
    starts = torch.randint(0, ids.numel() - length + 1, (count,), generator=gen)
    return torch.stack([ids[s: s + length] for s in starts.tolist()])


def batch_for_step(ids: torch.Tensor, step: int, batch_size: int, seq_len: int, seed: int) -> torch.Tensor:
    """The global batch of ``step``: (batch_size, seq_len + 1) windows at offsets drawn from (seed, step)."""
    if ids.numel() < seq_len + 2:
        raise DataError(f"the training text has {ids.numel()} tokens; at least --seq-len + 2 = {seq_len + 2} are needed")
    return sample_windows(ids, batch_size, seq_len + 1, step_generator(seed, step))


def calibration_ids(ids: torch.Tensor, samples: int, seqlen: int, seed: int) -> torch.Tensor:
    """(samples, seqlen) calibration windows (GPTQ's Hessians, pruning's importance scores)."""
    if ids.numel() < seqlen:
        raise DataError(f"the calibration text gives {ids.numel()} tokens, shorter than one sequence of "
                        f"{seqlen}; pass more text or a smaller --calib-seqlen")
    return sample_windows(ids, samples, seqlen, step_generator(seed, CALIBRATION_STREAM))


# --------------------------------------------------------------------------- distributed


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: str = "cpu"

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed(device: str = "cpu") -> Dist:
    """Join the process group that torchrun set up (WORLD_SIZE > 1), else a single process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist(device=device)
    import torch.distributed as dist

    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device.startswith("cuda"):
        torch.cuda.set_device(local)
        device = f"cuda:{local}"
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.startswith("cuda") else "gloo")
    return Dist(rank=rank, world=world, local_rank=local, device=device)


def barrier(d: Dist) -> None:
    if d.world > 1:
        import torch.distributed as dist

        dist.barrier()


# --------------------------------------------------------------------------- resumable state


def run_fingerprint(opts: TrainOptions, world: int, n_params: int, n_tokens: int) -> str:
    """What must match for a resumed run to continue the same run (logging cadence may change)."""
    o = asdict(opts)
    for key in ("eval_every", "save_every", "steps"):  # cadence, and how far to go: a run may be extended
        o.pop(key)
    return json.dumps({"options": o, "world": world, "params": n_params, "tokens": n_tokens}, sort_keys=True)


def read_state(path: Path, device: str = "cpu") -> dict:
    """A training state written by :meth:`Trainer.save_state`, read without unpickling code.
    Anything else (a truncated file, a pickle that would run code) is refused naming the file."""
    import pickle
    import warnings
    import zipfile

    try:
        with warnings.catch_warnings():  # torch warns about the pickle's protocol on stderr first: one line only
            warnings.simplefilter("ignore")
            state = torch.load(path, map_location=device, weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, zipfile.BadZipFile, OSError, KeyError,
            AttributeError, TypeError):
        # torch's own message suggests weights_only=False, which would run the file's code: never say that
        raise CheckpointError(f"{path} is not a readable itera training state (damaged, or not written by "
                              f"itera); remove {Path(path).parent} to start over without --resume") from None
    if not isinstance(state, dict) or not {"step", "model", "optim", "fingerprint"} <= set(state):
        raise CheckpointError(f"{path} is not an itera training state; remove {Path(path).parent} to start over")
    return state


def check_resumable(state_dir: Path, fingerprint: str, state: dict | None = None, steps: int | None = None,
                    finished_ok: bool = False) -> bool:
    """True if ``state_dir`` holds a checkpoint of the run with this fingerprint, False if it holds
    none; UsageError if it holds another run's, or (given ``steps``) one already at or past
    ``steps`` (at exactly ``steps`` is allowed with ``finished_ok``: a run whose training finished
    but whose output was never written, e.g. Ctrl-C during the last evaluation). Cheap enough to
    call before loading any model."""
    path = Path(state_dir) / "state.pt"
    if not path.is_file():
        return False
    if state is None:
        state = read_state(path)
    if state.get("fingerprint") != fingerprint:
        raise UsageError(f"the checkpoint in {state_dir} is from a run with other options or data; "
                         "pass the same options to --resume, or remove that directory to start over")
    if steps is not None and (state["step"] > steps or (state["step"] == steps and not finished_ok)):
        raise UsageError(f"the run in {state_dir} already reached step {state['step']}; pass --steps above "
                         f"{state['step']} to extend it")
    return True


# --------------------------------------------------------------------------- the loop


LossFn = Callable[[torch.nn.Module, torch.Tensor], tuple[torch.Tensor, dict]]


class Trainer:
    """Runs ``opts.steps`` optimizer steps of ``loss_fn`` over batches cut from ``train_ids``.

    ``loss_fn(model, batch)`` returns the mean loss over the batch's rows and a dict of floats
    to log. ``on_step(step, logs)`` and ``on_eval(step)`` are called on every process.
    ``extra`` (named ``extra_name`` in messages): parameters the loss learns outside the model,
    trained without weight decay, their gradients averaged over processes by hand (DDP wraps
    the model only), kept in the training state under "extra" and never in the model.
    """

    def __init__(self, model: torch.nn.Module, loss_fn: LossFn, train_ids: torch.Tensor, opts: TrainOptions,
                 dist: Dist | None = None, state_dir: Path | None = None,
                 on_step: Callable[[int, dict], None] | None = None, on_eval: Callable[[int], None] | None = None,
                 batch_fn: Callable[[int], torch.Tensor] | None = None, extra: torch.nn.Module | None = None,
                 extra_name: str = "the loss's own parameters"):
        self.dist = dist or Dist()
        self.opts = opts.validate(self.dist.world)
        self.model, self.loss_fn, self.train_ids = model, loss_fn, train_ids
        self.state_dir = Path(state_dir) if state_dir else None
        self.on_step, self.on_eval = on_step, on_eval
        # The global batch of a step: token windows by default; any (batch_size, ...) tensor that is
        # a pure function of the step otherwise (DPO passes pair indices).
        self.token_batches = batch_fn is None
        self.batch_fn = batch_fn or (lambda step: batch_for_step(train_ids, step, opts.batch_size, opts.seq_len, opts.seed))
        trainable = [p for p in model.parameters() if p.requires_grad]
        decay = [p for p in trainable if p.ndim >= 2]
        no_decay = [p for p in trainable if p.ndim < 2]
        groups = [{"params": decay, "weight_decay": opts.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        self.extra, self.extra_name = extra, extra_name
        self.extra_params = [p for p in extra.parameters() if p.requires_grad] if extra is not None else []
        if self.extra_params:  # a third group only then: existing callers' optimizer state keeps its layout
            groups.append({"params": self.extra_params, "weight_decay": 0.0})
        self.optim = torch.optim.AdamW(groups, lr=opts.lr, betas=(0.9, 0.95))
        self.wrapped = model
        if self.dist.world > 1:
            from torch.nn.parallel import DistributedDataParallel as DDP

            self.wrapped = DDP(model, device_ids=[self.dist.local_rank] if self.dist.device.startswith("cuda") else None)
        self.step = 0
        self.saved_step: int | None = None  # the step of the checkpoint in state_dir, once one is there
        self.losses: list[float] = []
        self.train_seconds = 0.0
        self.eval_seconds = 0.0  # this run's on_eval calls (--eval-every), apart from train_seconds

    # ------------------------------------------------------------------ state

    def fingerprint(self) -> str:
        return run_fingerprint(self.opts, self.dist.world, sum(p.numel() for p in self.model.parameters()),
                               int(self.train_ids.numel()) if self.train_ids is not None else 0)

    def save_state(self) -> None:
        if not (self.state_dir and self.dist.main):
            return
        self.state_dir.mkdir(parents=True, exist_ok=True)
        tmp = self.state_dir / "state.pt.tmp"
        # One file, renamed into place: a kill at any moment leaves the previous checkpoint whole,
        # and Ctrl-C (or any error) while it is written leaves no partial file behind.
        final = self.state_dir / "state.pt"
        before = _inode(final)
        try:
            state = {"step": self.step, "model": self.model.state_dict(), "optim": self.optim.state_dict(),
                     "losses": self.losses, "train_seconds": self.train_seconds, "fingerprint": self.fingerprint()}
            if self.extra is not None:
                state["extra"] = self.extra.state_dict()
            torch.save(state, tmp)
            os.replace(tmp, final)
        except BaseException:
            tmp.unlink(missing_ok=True)
            if _inode(final) not in (None, before):  # interrupted just after the rename: this step is kept
                self.saved_step = self.step
            raise
        self.saved_step = self.step

    def load_state(self) -> bool:
        """Continue from ``state_dir`` if it holds a checkpoint of this same run; False if it holds none."""
        if not self.state_dir or not (self.state_dir / "state.pt").is_file():
            return False
        state = read_state(self.state_dir / "state.pt", self.dist.device)
        check_resumable(self.state_dir, self.fingerprint(), state)
        if (self.extra is None) != ("extra" not in state):
            saved = "with" if "extra" in state else "without"
            raise UsageError(f"the checkpoint in {self.state_dir} was saved {saved} {self.extra_name}; resume with the "
                             "options it was saved with, or remove that directory to start over")
        self.model.load_state_dict(state["model"])
        if self.extra is not None:
            self.extra.load_state_dict(state["extra"])
        self.optim.load_state_dict(state["optim"])
        self.step, self.losses, self.train_seconds = state["step"], list(state["losses"]), state["train_seconds"]
        self.saved_step = self.step
        return True

    def autocast(self):
        """bf16 autocast when asked (or by default on CUDA); None for float32."""
        kind = "cuda" if self.dist.device.startswith("cuda") else "cpu"
        wanted = self.opts.dtype in ("bf16", "bfloat16") or (self.opts.dtype == "auto" and kind == "cuda")
        return torch.autocast(kind, dtype=torch.bfloat16) if wanted else None

    # ------------------------------------------------------------------ loop

    def run(self) -> dict:
        o, d = self.opts, self.dist
        per_rank = o.batch_size // d.world
        micro = per_rank // o.grad_accum
        autocast = self.autocast()
        self.model.train()
        while self.step < o.steps:
            t0 = time.perf_counter()
            lr = lr_at(self.step, o)
            for group in self.optim.param_groups:
                group["lr"] = lr
            batch = self.batch_fn(self.step)
            rows = batch[d.rank * per_rank:(d.rank + 1) * per_rank].to(d.device)
            self.optim.zero_grad(set_to_none=True)
            step_loss, logs = 0.0, {}
            for k in range(o.grad_accum):
                mb = rows[k * micro:(k + 1) * micro]
                sync = k == o.grad_accum - 1 or d.world == 1
                ctx = self.wrapped.no_sync() if not sync else _null()
                with ctx, (autocast or _null()):
                    loss, logs = self.loss_fn(self.wrapped, mb)
                    (loss / o.grad_accum).backward()
                step_loss += loss.item() / o.grad_accum
            if self.extra_params and d.world > 1:
                _average_grads(self.extra_params, d.world)
            grad_norm = torch.nn.utils.clip_grad_norm_(trainable_params(self.model) + self.extra_params, o.grad_clip)
            self.optim.step()
            self.train_seconds += time.perf_counter() - t0
            self.losses.append(step_loss)
            self.step += 1
            if self.on_step:
                logs = {"loss": step_loss, "lr": lr, "grad_norm": float(grad_norm), **logs}
                if self.token_batches:  # the record's definition: tokens seen / training seconds
                    logs["tokens_per_s"] = self.step * o.batch_size * o.seq_len / self.train_seconds
                self.on_step(self.step, logs)
            if o.eval_every and self.step % o.eval_every == 0 and self.step < o.steps and self.on_eval:
                self.model.eval()
                t0 = time.perf_counter()
                self.on_eval(self.step)
                self.eval_seconds += time.perf_counter() - t0
                self.model.train()
            if o.save_every and self.step % o.save_every == 0 and self.step < o.steps:
                self.save_state()
                barrier(d)
        if self.state_dir and self.step > 0:  # the finished run's state: --resume --steps N extends it
            self.save_state()
            barrier(d)
        self.model.eval()
        tokens = o.steps * o.batch_size * o.seq_len  # for token-window batches
        tail = self.losses[-10:]
        return {"tokens_seen": tokens, "train_seconds": self.train_seconds, "eval_seconds": self.eval_seconds,
                "tokens_per_s": tokens / self.train_seconds if self.train_seconds else None,
                "first_loss": self.losses[0], "final_loss": sum(tail) / len(tail)}


def trainable_params(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def _average_grads(params: list[torch.nn.Parameter], world: int) -> None:
    """What DDP does for the model's gradients, for parameters outside it: the mean over processes."""
    import torch.distributed as dist

    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        dist.all_reduce(p.grad)
        p.grad.div_(world)


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False
