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
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from itera.errors import UsageError
from itera.preference import Pair

LOSSES = ("sigmoid", "ipo")


def dpo_loss(pi_c: torch.Tensor, pi_r: torch.Tensor, ref_c: torch.Tensor, ref_r: torch.Tensor, beta: float,
             kind: str = "sigmoid", label_smoothing: float = 0.0) -> tuple[torch.Tensor, dict]:
    """Mean loss over pairs and per-pair figures: rewards beta*(log pi - log ref) and the margin."""
    h = (pi_c - ref_c) - (pi_r - ref_r)
    if kind == "sigmoid":
        losses = -(1 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)
    elif kind == "ipo":
        losses = (h - 1 / (2 * beta)) ** 2
    else:
        raise UsageError(f"unknown --loss {kind!r}; use sigmoid or ipo")
    chosen_r, rejected_r = beta * (pi_c - ref_c).detach(), beta * (pi_r - ref_r).detach()
    return losses.mean(), {"chosen_rewards": chosen_r, "rejected_rewards": rejected_r}


def reward_accuracy(margins: torch.Tensor) -> float:
    """Share of pairs whose chosen reward beats the rejected one; a tie counts as half."""
    return ((margins > 0).float() + 0.5 * (margins == 0).float()).mean().item()


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
        prompt = tok.encode(p.prompt)  # BOS as the tokenizer says
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
    return torch.cat(out) if out else torch.zeros(0, 2)


def cache_key(model_sha: str, enc: Encoded) -> str:
    h = hashlib.sha256(model_sha.encode())
    h.update(enc.ids.numpy().tobytes())
    h.update(enc.mask.numpy().tobytes())
    return h.hexdigest()


def cached_reference(model, enc: Encoded, model_sha: str, cache_dir: Path) -> tuple[torch.Tensor, bool]:
    """Reference log-probs from the cache when this model and data were seen before; (values, hit)."""
    from itera.record import write_text_atomic

    path = Path(cache_dir) / f"{cache_key(model_sha, enc)}.json"
    if path.is_file():
        try:
            return torch.tensor(json.loads(path.read_text())["logprobs"], dtype=torch.float32), True
        except (ValueError, KeyError):
            pass  # a damaged cache entry is recomputed
    ref = reference_logprobs(model, enc)
    write_text_atomic(path, json.dumps({"logprobs": ref.tolist()}))
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
        kl = (logp.exp() * (logp - logq)).sum(-1)
        total += (kl * mask).sum().item()
        count += mask.sum().item()
    return total / max(count, 1.0)


@dataclass
class DPOOptions:
    model: Path
    out: Path
    pairs: Path | None = None
    feedback: Path | None = None
    beta: float = 0.1
    loss: str = "sigmoid"
    label_smoothing: float = 0.0
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    lora_targets: str = "q,k,v,o,gate,up,down"
    holdout: float = 0.1
    min_rating_gap: float = 1.0
    merge: bool = False
    save_pairs: Path | None = None

    def validate(self) -> "DPOOptions":
        if (self.pairs is None) == (self.feedback is None):
            raise UsageError("pass exactly one of --pairs FILE or --feedback FILE")
        if not self.beta > 0:
            raise UsageError(f"--beta must be positive (got {self.beta})")
        if self.loss not in LOSSES:
            raise UsageError(f"unknown --loss {self.loss!r}; use sigmoid or ipo")
        if not 0 <= self.label_smoothing < 0.5:
            raise UsageError(f"--label-smoothing must be in [0, 0.5) (got {self.label_smoothing})")
        if not 0 <= self.holdout < 1:
            raise UsageError(f"--holdout must be in [0, 1) (got {self.holdout})")
        if not 0 <= self.lora_dropout < 1:
            raise UsageError(f"--lora-dropout must be in [0, 1) (got {self.lora_dropout})")
        return self

    def as_params(self) -> dict:
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(self).items()}


def split_pairs(pairs: list[Pair], holdout: float, seed: int) -> tuple[list[Pair], list[Pair]]:
    """A fixed held-out share, chosen by a hash of each pair (stable when pairs are added)."""
    held = [p for p in pairs if int(hashlib.sha256(f"{seed}|{p.prompt}|{p.chosen}|{p.rejected}".encode())
                                    .hexdigest(), 16) % 1000 < holdout * 1000]
    held_set = set(held)
    return [p for p in pairs if p not in held_set], held


def run_dpo(opts: DPOOptions, train, log=lambda m: None, on_step=None, dist=None) -> dict:
    """Validate, build pairs, cache reference log-probs, train LoRA adapters, measure, write."""
    from itera.lora import add_lora, merge_lora, parse_targets, save_adapter
    from itera.model.checkpoint import check_against_config, load_config, load_model, read_headers, save_model
    from itera.paths import cache_dir
    from itera.preference import pairs_from_feedback, read_pairs
    from itera.record import artifact_digest, atomic_dir
    from itera.tokenizer import Tokenizer
    from itera.train import Dist, Trainer, barrier

    dist = dist or Dist()

    opts.validate()
    targets = parse_targets(opts.lora_targets)
    if opts.lora_rank < 1:
        raise UsageError(f"--lora-rank must be at least 1 (got {opts.lora_rank})")
    cfg = load_config(opts.model)
    if cfg.quantization:
        raise UsageError(f"{opts.model} is quantized; train adapters on the float checkpoint")
    check_against_config(cfg, read_headers(opts.model), opts.model)
    dropped: dict[str, int] = {}
    if opts.pairs is not None:
        pairs = read_pairs(opts.pairs)
    else:
        pairs, dropped = pairs_from_feedback(opts.feedback, opts.min_rating_gap)
        if not pairs:
            raise UsageError(f"{opts.feedback} gives no usable preference pairs (dropped: {dropped})")
    tok = Tokenizer.from_dir(opts.model)
    train_pairs, held_pairs = split_pairs(pairs, opts.holdout, train.seed)
    if not train_pairs:
        raise UsageError("no pairs left for training after the held-out split; pass more pairs or --holdout 0")
    enc_train, d1 = encode_pairs(tok, train_pairs, cfg.max_position_embeddings)
    enc_held, d2 = encode_pairs(tok, held_pairs, cfg.max_position_embeddings)
    for reason in d1 + d2:
        dropped[reason] = dropped.get(reason, 0) + 1
    if enc_train.ids.shape[0] == 0:
        raise UsageError("every training pair was dropped (" + ", ".join(dropped) + ")")
    log(f"pairs: {enc_train.ids.shape[0]} train, {enc_held.ids.shape[0]} held out, dropped {sum(dropped.values())}")

    model, _ = load_model(opts.model)
    model_sha = artifact_digest(Path(opts.model))[1]
    add_lora(model, targets, opts.lora_rank, opts.lora_alpha, opts.lora_dropout, seed=train.seed)
    ref_dir = cache_dir() / "dpo-ref"
    ref_train, hit_train = cached_reference(model, enc_train, model_sha, ref_dir)
    ref_held, hit_held = cached_reference(model, enc_held, model_sha, ref_dir) if enc_held.ids.shape[0] else \
        (torch.zeros(0, 2), True)
    model.eval()
    before = evaluate_pairs(model, enc_held, ref_held, opts.beta, opts.loss, opts.label_smoothing) \
        if enc_held.ids.shape[0] else None

    n = enc_train.ids.shape[0]

    def batch_fn(step: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(train.seed * 1_000_003 + step)
        return torch.randint(0, n, (train.batch_size,), generator=g)

    def loss_fn(m, idx: torch.Tensor):
        ids = enc_train.ids[idx].flatten(0, 1)
        mask = enc_train.mask[idx].flatten(0, 1)
        pol = sequence_logprobs(m, ids, mask).view(-1, 2)
        ref = ref_train[idx]
        loss, f = dpo_loss(pol[:, 0], pol[:, 1], ref[:, 0], ref[:, 1], opts.beta, opts.loss, opts.label_smoothing)
        margin = f["chosen_rewards"] - f["rejected_rewards"]
        return loss, {"reward_accuracy": reward_accuracy(margin), "reward_margin": margin.mean().item()}

    trainer = Trainer(model, loss_fn, None, train, dist=dist, on_step=on_step, batch_fn=batch_fn)
    stats = trainer.run()
    model.eval()
    train_eval = evaluate_pairs(model, enc_train, ref_train, opts.beta, opts.loss, opts.label_smoothing)
    held_eval = evaluate_pairs(model, enc_held, ref_held, opts.beta, opts.loss, opts.label_smoothing) \
        if enc_held.ids.shape[0] else None
    kl = kl_to_reference(model, enc_held) if enc_held.ids.shape[0] else None

    metrics = {
        "train": train_eval, "heldout": held_eval, "heldout_before": before, "kl_to_reference": kl,
        "pairs_used": int(n), "pairs_heldout": int(enc_held.ids.shape[0]),
        "pairs_dropped": sum(dropped.values()), "dropped_reasons": dropped,
        "reference_cache_hit": bool(hit_train and hit_held),
        "train_seconds": stats["train_seconds"], "first_loss": stats["first_loss"], "final_loss": stats["final_loss"],
        "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
    }
    params = {**opts.as_params(), "train": train.as_params(), "processes": dist.world}
    if not dist.main:  # under torchrun only rank 0 writes
        barrier(dist)
        return {"metrics": metrics, "params": params, "model": model}
    with atomic_dir(opts.out) as tmp:
        save_adapter(model, tmp, targets, opts.lora_rank, opts.lora_alpha, opts.lora_dropout,
                     str(Path(opts.model).resolve()))
        (tmp / "dpo_config.json").write_text(json.dumps(params, indent=2) + "\n")
        if opts.merge:
            merge_lora(model)
            save_model(model, tmp / "merged", tokenizer_from=Path(opts.model))
    if opts.save_pairs is not None:
        from itera.record import write_text_atomic

        write_text_atomic(Path(opts.save_pairs), "".join(json.dumps(asdict(p)) + "\n" for p in pairs))
    barrier(dist)
    return {"metrics": metrics, "params": params, "model": model}
