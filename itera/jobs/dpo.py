"""Direct Preference Optimization (Rafailov et al. 2023) with LoRA adapters.

For a pair (prompt x, chosen y_w, rejected y_l), with log-probabilities summed over response
tokens only, the implicit reward margin is

    h = [log pi(y_w|x) - log ref(y_w|x)] - [log pi(y_l|x) - log ref(y_l|x)]

and the losses are

    sigmoid (DPO, conservative with label smoothing eps):
        -(1 - eps) * log sigmoid(beta * h) - eps * log sigmoid(-beta * h)
    ipo (Azar et al. 2023):  (h - 1 / (2 * beta))^2

The reference is the base model with the adapters switched off; its log-probabilities are
computed once per pair and cached under ``$ITERA_HOME/cache/dpo-ref/`` keyed by the model's and
the data's hashes.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from itera.errors import InputError, UsageError
from itera.losses import DPO_LOSSES, dpo_loss, kl_div, reward_accuracy
from itera.preference import Pair
from itera.options import flag, nested
from itera.progress import SILENT, Reporter
from itera.artifacts import describe_artifact
from itera.record import Outcome
from itera.chat import encode_rendered
from itera.train import Dist, TrainOptions


@dataclass
class Encoded:
    ids: torch.Tensor  # (n, 2, T) chosen and rejected, right-padded
    mask: torch.Tensor  # (n, 2, T) 1 where the token is a response token to score
    lengths: torch.Tensor  # (n, 2)


def encode_pairs(tok, pairs: list[Pair], max_len: int) -> tuple[Encoded, list[str]]:
    """Token ids of prompt+response for both sides; responses are scored, prompts masked.
    Pairs longer than ``max_len`` are dropped (reasons returned)."""
    rows, drops = [], []
    for p in pairs:
        # BOS as the tokenizer says; a chat prompt as the server tokenized it (special tokens parsed)
        prompt = encode_rendered(tok, p.prompt) if p.chat else tok.encode(p.prompt)
        sides = []
        for resp in (p.chosen, p.rejected):
            r = tok.encode(resp, add_bos=False)
            sides.append((prompt + r, len(prompt)))
        if max(len(s) for s, _ in sides) > max_len:
            drops.append("longer than the model's context")
            continue
        if min(len(s) - n for s, n in sides) < 1:
            drops.append("empty response")
            continue
        rows.append(sides)
    T = max((len(s) for sides in rows for s, _ in sides), default=1)
    ids = torch.zeros(len(rows), 2, T, dtype=torch.long)
    mask = torch.zeros(len(rows), 2, T)
    lengths = torch.zeros(len(rows), 2, dtype=torch.long)
    for i, sides in enumerate(rows):
        for j, (s, n_prompt) in enumerate(sides):
            ids[i, j, : len(s)] = torch.tensor(s)
            mask[i, j, n_prompt: len(s)] = 1
            lengths[i, j] = len(s)
    return Encoded(ids, mask, lengths), drops


def sequence_logprobs(model, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Sum of log p(token | earlier tokens) over masked (response) positions; ids/mask (B, T)."""
    logits = model(ids[:, :-1]).float()
    logp = torch.log_softmax(logits, -1).gather(-1, ids[:, 1:, None])[..., 0]
    return (logp * mask[:, 1:]).sum(-1)


@torch.no_grad()
def reference_logprobs(model, enc: Encoded, chunk: int = 16) -> torch.Tensor:
    from itera.lora import adapters_disabled

    out = []
    with adapters_disabled(model):
        for i in range(0, enc.ids.shape[0], chunk):
            ids = enc.ids[i:i + chunk].flatten(0, 1)
            mask = enc.mask[i:i + chunk].flatten(0, 1)
            out.append(sequence_logprobs(model, ids, mask).view(-1, 2))
    return torch.cat(out) if out else torch.zeros(0, 2, device=enc.ids.device)


def tokenizer_digest(ckpt: Path) -> str:
    """sha256 over the tokenizer files of a checkpoint (their content, links followed)."""
    from itera.fsio import sha256_file
    from itera.model.checkpoint import TOKENIZER_FILES

    h = hashlib.sha256()
    for name in TOKENIZER_FILES:
        f = Path(ckpt) / name
        h.update(f"{name}:{sha256_file(f) if f.is_file() else '-'}\n".encode())
    return h.hexdigest()


def cache_key(model_sha: str, enc: Encoded, tokenizer_sha: str = "") -> str:
    """The reference log-probs' identity: the model's content, its tokenizer's, and the token ids."""
    h = hashlib.sha256(model_sha.encode())
    h.update(tokenizer_sha.encode())
    h.update(enc.ids.cpu().numpy().tobytes())
    h.update(enc.mask.cpu().numpy().tobytes())
    return h.hexdigest()


def cached_reference(model, enc: Encoded, model_sha: str, cache_dir: Path, tokenizer_sha: str = ""
                     ) -> tuple[torch.Tensor, bool]:
    """Reference log-probs from the cache when this model, tokenizer and data were seen before; (values, hit)."""
    from itera.fsio import write_text_atomic

    path = Path(cache_dir) / f"{cache_key(model_sha, enc, tokenizer_sha)}.json"
    if path.is_file():
        try:
            return torch.tensor(json.loads(path.read_text())["logprobs"], dtype=torch.float32,
                                device=enc.ids.device), True
        except (ValueError, KeyError):
            pass  # a damaged cache entry is recomputed
    ref = reference_logprobs(model, enc)
    try:
        write_text_atomic(path, json.dumps({"logprobs": ref.cpu().tolist()}))
    except OSError:
        pass  # no writable cache ($ITERA_HOME): computed again next time
    return ref, False


@torch.no_grad()
def evaluate_pairs(model, enc: Encoded, ref: torch.Tensor, beta: float, kind: str, label_smoothing: float) -> dict:
    pol = torch.cat([sequence_logprobs(model, enc.ids[i:i + 16].flatten(0, 1), enc.mask[i:i + 16].flatten(0, 1))
                     .view(-1, 2) for i in range(0, enc.ids.shape[0], 16)])
    loss, f = dpo_loss(pol[:, 0], pol[:, 1], ref[:, 0], ref[:, 1], beta, kind, label_smoothing)
    margin = f["chosen_rewards"] - f["rejected_rewards"]
    return {"loss": loss.item(), "reward_accuracy": reward_accuracy(margin),
            "chosen_reward": f["chosen_rewards"].mean().item(), "rejected_reward": f["rejected_rewards"].mean().item(),
            "reward_margin": margin.mean().item(), "pairs": int(enc.ids.shape[0])}


@torch.no_grad()
def kl_to_reference(model, enc: Encoded) -> float:
    """Mean per-token KL(policy || reference) over the chosen responses of held-out pairs."""
    from itera.lora import adapters_disabled

    total, count = 0.0, 0.0
    for i in range(enc.ids.shape[0]):
        ids, mask = enc.ids[i, 0:1], enc.mask[i, 0, 1:]
        logp = torch.log_softmax(model(ids[:, :-1]).float(), -1)[0]
        with adapters_disabled(model):
            logq = torch.log_softmax(model(ids[:, :-1]).float(), -1)[0]
        kl = kl_div(logp, logq)
        total += (kl * mask).sum().item()
        count += mask.sum().item()
    return total / max(count, 1.0)


@dataclass
class DPOOptions:
    model: Path = flag("--model")  # the CLI's default: the artifact of the record on stdin
    out: Path = flag("--out")
    pairs: Path | None = flag("--pairs", default=None)
    feedback: Path | None = flag("--feedback", default=None)
    # itera serve's store of responses and feedback (the CLI reads `default` as the server's default store)
    feedback_db: Path | str | None = flag("--feedback-db", default=None)  # a SQLite file or a PostgreSQL URL
    beta: float = flag("--beta", default=0.1)
    loss: str = flag("--loss", default="sigmoid")
    label_smoothing: float = flag("--label-smoothing", default=0.0)
    lora_rank: int = flag("--lora-rank", default=8)
    lora_alpha: float = flag("--lora-alpha", default=16.0)
    lora_dropout: float = flag("--lora-dropout", default=0.0)
    lora_targets: str = flag("--lora-targets", default="q,k,v,o,gate,up,down")
    holdout: float = flag("--holdout", default=0.1)
    min_rating_gap: float = flag("--min-rating-gap", default=1.0)
    merge: bool = flag("--merge", default=False)
    # dtype of merged/ (with --merge): auto is the base's stored dtype; training runs in float32 regardless
    save_dtype: str = flag("--save-dtype", default="auto")
    save_pairs: Path | None = flag("--save-pairs", default=None)
    device: str = flag("--device", default="cpu", cli_default="auto",
                       why="the CLI resolves auto (cuda when available) for its process and sets the field")
    force: bool = flag("--force", default=False)
    train: TrainOptions = nested(
        default_factory=lambda: TrainOptions(steps=100, batch_size=8, seq_len=1, lr=1e-3, warmup_steps=5,
                                             weight_decay=0.0),
        internal={"grad_accum": "fixed: one micro-batch of pairs per step on each process",
                  "seq_len": "unused: a batch is pair indices, not token windows",
                  "weight_decay": "fixed at 0 for the LoRA adapters",
                  "grad_clip": "fixed: TrainOptions' max gradient norm",
                  "eval_every": "no effect: held-out pairs are scored before and after training only",
                  "save_every": "no effect: dpo-train writes no resumable checkpoints"})

    def validate(self) -> "DPOOptions":
        from itera.lora import parse_targets
        from itera.model.checkpoint import check_save_dtype

        self.train.validate()
        self.save_dtype = check_save_dtype(self.save_dtype)
        if sum(x is not None for x in (self.pairs, self.feedback, self.feedback_db)) != 1:
            raise UsageError("pass exactly one of --pairs FILE or --feedback FILE (or --feedback-db FILE, the store "
                             "`itera serve` writes)")
        from itera import pg

        if self.feedback_db is not None and not pg.is_url(self.feedback_db) and not Path(self.feedback_db).is_file():
            raise InputError(f"no feedback store at {self.feedback_db}; serve a model with `itera serve` and post "
                             "feedback to /v1/feedback first, or pass the server's --feedback-db")
        if not self.beta > 0:
            raise UsageError(f"--beta must be positive (got {self.beta})")
        if self.loss not in DPO_LOSSES:
            raise UsageError(f"unknown --loss {self.loss!r}; use sigmoid or ipo")
        if not 0 <= self.label_smoothing < 0.5:
            raise UsageError(f"--label-smoothing must be in [0, 0.5) (got {self.label_smoothing})")
        if not 0 <= self.holdout < 1:
            raise UsageError(f"--holdout must be in [0, 1) (got {self.holdout})")
        if not 0 <= self.lora_dropout < 1:
            raise UsageError(f"--lora-dropout must be in [0, 1) (got {self.lora_dropout})")
        if self.lora_rank < 1:
            raise UsageError(f"--lora-rank must be at least 1 (got {self.lora_rank})")
        parse_targets(self.lora_targets)
        return self

    def inputs(self) -> list[Path]:
        from itera import pg

        db = None if pg.is_url(self.feedback_db) else self.feedback_db
        return [Path(p) for p in (self.model, self.pairs, self.feedback, db) if p is not None]

    def outputs(self) -> list:
        from itera.fsio import Output

        outs = [Output(self.out, "dir", "--out", self.force)]
        if self.save_pairs is not None:
            outs.append(Output(self.save_pairs, "file", "--save-pairs", self.force))
        return outs

    @property
    def targets(self) -> list[str]:
        from itera.lora import parse_targets

        return parse_targets(self.lora_targets)

    def as_params(self) -> dict:
        from itera import pg

        d = {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(self).items()}
        d.pop("train")
        if d.get("feedback_db"):
            d["feedback_db"] = pg.mask(d["feedback_db"])  # a URL's password is never printed
        return d


def split_pairs(pairs: list[Pair], holdout: float, seed: int) -> tuple[list[Pair], list[Pair]]:
    """A fixed held-out share, chosen by a hash of each pair (stable when pairs are added)."""
    held = [p for p in pairs if int(hashlib.sha256(f"{seed}|{p.prompt}|{p.chosen}|{p.rejected}".encode())
                                    .hexdigest(), 16) % 1000 < holdout * 1000]
    held_set = set(held)
    return [p for p in pairs if p not in held_set], held


# --------------------------------------------------------------------------- phases


MIN_HELD = 10  # held-out pairs below which a reward accuracy says little (one pair is 10 points)


@dataclass
class PairData:
    pairs: list[Pair]  # every usable pair (what --save-pairs writes)
    train: Encoded
    held: Encoded
    dropped: dict[str, int]
    heldout_note: str | None = None  # why there is no held-out evaluation, when there is none


def load_pairs(opts: DPOOptions, tok, max_len: int) -> PairData:
    """Pairs from --pairs, a feedback file or the serving store, split and tokenized; what was dropped and why."""
    from itera.preference import pairs_from_feedback, read_pairs

    dropped: dict[str, int] = {}
    if opts.pairs is not None:
        pairs = read_pairs(opts.pairs)
    elif opts.feedback is not None:
        pairs, dropped = pairs_from_feedback(opts.feedback, opts.min_rating_gap)
        if not pairs:
            raise UsageError(f"{opts.feedback} gives no usable preference pairs (dropped: {dropped})")
    else:  # itera serve's store: events with the texts of the responses they name
        from itera.feedback import read_events
        from itera.pg import mask as pg_mask
        from itera.preference import pairs_from_events

        pairs, dropped = pairs_from_events(read_events(opts.feedback_db), opts.min_rating_gap)
        if not pairs:
            raise UsageError(f"the feedback in {pg_mask(opts.feedback_db)} gives no usable preference pairs "
                             f"(dropped: {dropped})")
    train_pairs, held_pairs = split_pairs(pairs, opts.holdout, opts.train.seed)
    if opts.holdout > 0 and not held_pairs:
        dropped_note = (f"the held-out split is empty: {opts.holdout:g} of {len(pairs)} pairs rounds to none; about "
                        f"{math.ceil(MIN_HELD / opts.holdout)} pairs give {MIN_HELD} held out, the least that says "
                        "anything")
    else:
        dropped_note = None
    if not train_pairs:
        raise UsageError("no pairs left for training after the held-out split; pass more pairs or --holdout 0")
    enc_train, d1 = encode_pairs(tok, train_pairs, max_len)
    enc_held, d2 = encode_pairs(tok, held_pairs, max_len)
    for reason in d1 + d2:
        dropped[reason] = dropped.get(reason, 0) + 1
    if enc_train.ids.shape[0] == 0:
        raise UsageError("every training pair was dropped (" + ", ".join(dropped) + ")")
    return PairData(pairs, enc_train, enc_held, dropped, dropped_note)


def references(model, data: PairData, ckpt: Path) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """Reference log-probs of the training and held-out pairs (cached by the checkpoint's content
    hash, its tokenizer's and the data's); and whether both were cache hits."""
    from itera.fsio import artifact_digest
    from itera.paths import cache_dir

    ref_dir = cache_dir() / "dpo-ref"
    keys = (artifact_digest(Path(ckpt))[1], tokenizer_digest(ckpt))
    ref_train, hit_train = cached_reference(model, data.train, keys[0], ref_dir, keys[1])
    if data.held.ids.shape[0] == 0:
        return ref_train, torch.zeros(0, 2, device=ref_train.device), hit_train
    ref_held, hit_held = cached_reference(model, data.held, keys[0], ref_dir, keys[1])
    return ref_train, ref_held, hit_train and hit_held


def fit(opts: DPOOptions, model, data: PairData, ref_train: torch.Tensor, dist: Dist, reporter: Reporter) -> dict:
    """Train the adapters on random pairs per step (a pure function of seed and step)."""
    from itera.train import Trainer, step_generator

    n = data.train.ids.shape[0]

    def batch_fn(step: int) -> torch.Tensor:
        return torch.randint(0, n, (opts.train.batch_size,), generator=step_generator(opts.train.seed, step))

    def loss_fn(m, idx: torch.Tensor):
        ids = data.train.ids[idx].flatten(0, 1)
        mask = data.train.mask[idx].flatten(0, 1)
        pol = sequence_logprobs(m, ids, mask).view(-1, 2)
        ref = ref_train[idx]
        loss, f = dpo_loss(pol[:, 0], pol[:, 1], ref[:, 0], ref[:, 1], opts.beta, opts.loss, opts.label_smoothing)
        margin = f["chosen_rewards"] - f["rejected_rewards"]
        return loss, {"reward_accuracy": reward_accuracy(margin), "reward_margin": margin.mean().item()}

    task = reporter.task("dpo", total=opts.train.steps)
    try:
        return Trainer(model, loss_fn, None, opts.train, dist=dist, batch_fn=batch_fn,
                       on_step=lambda s, logs: task.update(s, loss=logs["loss"])).run()
    finally:
        task.close()


def merged_dtype(opts: DPOOptions, base_dtype: str) -> tuple[str, str]:
    """The dtype merged/ is written in, and why: --save-dtype, else the base's stored dtype (a
    float16 base gives a float16 merged model, not one twice its size)."""
    if opts.save_dtype != "auto":
        return opts.save_dtype, f"--save-dtype {opts.save_dtype}"
    return base_dtype, "the base model's stored dtype (--save-dtype auto)"


def write(opts: DPOOptions, model, data: PairData, params: dict, dtype: str = "float32") -> None:
    """The adapter in PEFT's layout, the resolved options, and with --merge the merged checkpoint in
    ``dtype`` (the model in memory is left merged and rounded to it: what merged/ holds)."""
    from itera.fsio import atomic_dir, write_text_atomic
    from itera.lora import merge_lora, save_adapter
    from itera.model.checkpoint import round_to_dtype, save_model

    with atomic_dir(opts.out) as tmp:
        save_adapter(model, tmp, opts.targets, opts.lora_rank, opts.lora_alpha, opts.lora_dropout,
                     str(Path(opts.model).resolve()))
        (tmp / "dpo_config.json").write_text(json.dumps(params, indent=2) + "\n")
        if opts.merge:
            merge_lora(model)
            round_to_dtype(model, dtype, "merged model")
            save_model(model, tmp / "merged", tokenizer_from=Path(opts.model), dtype=dtype)
    if opts.save_pairs is not None:
        write_text_atomic(Path(opts.save_pairs), "".join(json.dumps(p.as_dict()) + "\n" for p in data.pairs))


# --------------------------------------------------------------------------- the job


def run_dpo(opts: DPOOptions, reporter: Reporter = SILENT, dist: Dist | None = None) -> Outcome:
    """Validate, build pairs, cache reference log-probs, train LoRA adapters, measure, write."""
    from itera.lora import add_lora
    from itera.model.checkpoint import load_checked_config, load_model, stored_dtype
    from itera.tokenizer import Tokenizer
    from itera.train import barrier

    dist = dist or Dist(device=opts.device)
    opts.validate()
    cfg, headers = load_checked_config(opts.model)
    dtype, dtype_reason = merged_dtype(opts, stored_dtype(cfg, headers))
    if cfg.quantization:
        raise UsageError(f"{opts.model} is quantized; train adapters on the float checkpoint")
    tok = Tokenizer.from_dir(opts.model)
    tok.check_fits(cfg.vocab_size, str(opts.model))
    data = load_pairs(opts, tok, cfg.max_position_embeddings)
    held = data.held.ids.shape[0] > 0
    reporter.log(f"pairs: {data.train.ids.shape[0]} train, {data.held.ids.shape[0]} held out, "
                 f"dropped {sum(data.dropped.values())}")
    if data.heldout_note:
        reporter.log(data.heldout_note)
    for enc in (data.train, data.held):  # the pairs live where the model computes
        enc.ids, enc.mask, enc.lengths = enc.ids.to(dist.device), enc.mask.to(dist.device), enc.lengths.to(dist.device)
    model, _ = load_model(opts.model, device=dist.device)
    add_lora(model, opts.targets, opts.lora_rank, opts.lora_alpha, opts.lora_dropout, seed=opts.train.seed)
    ref_train, ref_held, hit = references(model, data, Path(opts.model))
    model.eval()
    score = lambda enc, ref: evaluate_pairs(model, enc, ref, opts.beta, opts.loss, opts.label_smoothing)  # noqa: E731
    before = score(data.held, ref_held) if held else None
    stats = fit(opts, model, data, ref_train, dist, reporter)
    model.eval()
    metrics = {
        "train": score(data.train, ref_train), "heldout": score(data.held, ref_held) if held else None,
        "heldout_before": before, "kl_to_reference": kl_to_reference(model, data.held) if held else None,
        "pairs_used": int(data.train.ids.shape[0]), "pairs_heldout": int(data.held.ids.shape[0]),
        "pairs_dropped": sum(data.dropped.values()), "dropped_reasons": data.dropped,
        "heldout_note": data.heldout_note,
        "reference_cache_hit": bool(hit),
        "train_seconds": stats["train_seconds"], "first_loss": stats["first_loss"], "final_loss": stats["final_loss"],
        "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
    }
    params = {**opts.as_params(), "train": opts.train.as_params(), "processes": dist.world}
    artifact = None
    if dist.main:  # under torchrun only rank 0 writes
        write(opts, model, data, params, dtype)
        if opts.merge:
            # the held-out figures above are the adapter's on the base in float32; these are merged/'s, as saved
            metrics.update(merged_dtype=dtype, merged_dtype_reason=dtype_reason,
                           heldout_merged=score(data.held, ref_held) if held else None,
                           heldout_measured_on=f"heldout, heldout_before and kl_to_reference: the adapter on the "
                                               f"base in float32; heldout_merged: merged/ as saved ({dtype})")
            reporter.log(f"merged/ saved in {dtype} ({dtype_reason})" + (
                f"; its held-out reward accuracy as saved {metrics['heldout_merged']['reward_accuracy']:.3f}"
                if held else ""))
        if opts.merge:  # what the next command (export, evaluate) takes; the adapter is listed beside it
            artifact = {**describe_artifact(opts.out / "merged", "checkpoint", "safetensors"), "adapter": str(opts.out)}
        else:
            artifact = describe_artifact(opts.out, "adapter", "peft-lora")
    barrier(dist)
    return Outcome(artifact, metrics, params, device=dist.device)
