"""Direct Preference Optimization (Rafailov et al. 2023) with LoRA adapters.

For a pair (prompt x, chosen y_w, rejected y_l), with log-probabilities summed over response
tokens only, the implicit reward margin is

    h = [log pi(y_w|x) - log ref(y_w|x)] - [log pi(y_l|x) - log ref(y_l|x)]

and the losses are

    sigmoid (DPO, conservative with label smoothing eps):
        -(1 - eps) * log sigmoid(beta * h) - eps * log sigmoid(-beta * h)
    ipo (Azar et al. 2023):  (h - 1 / (2 * beta))^2

Responses judged one at a time (a thumbs up or down with no opposite vote on its prompt, a
rating) train with KTO (Ethayarajh et al. 2024, ``--loss kto``; ``--loss auto``, the default,
trains pairs with DPO and the rest with KTO in the same run, each weighted by its share of the
examples): ``w_D (1 - sigmoid(beta (r - z0)))`` for a desirable response and
``w_U (1 - sigmoid(beta (z0 - r)))`` for an undesirable one, ``r = log pi(y|x) - log ref(y|x)``,
the reference point ``z0`` the batch's mean ``log pi - log ref`` over mismatched prompt/completion
pairs (each prompt with the next example's completion), clamped at 0 and held constant.

A response that ended (``finish_reason: "stop"``) is scored with the end-of-turn token that ended
it, or the stop string that did; one cut at max_tokens is scored without one.

The reference is the base model with the adapters switched off; its log-probabilities are
computed once per pair and cached under ``$ITERA_HOME/cache/dpo-ref/`` keyed by the model's and
the data's hashes.

``--lm-data TEXT`` mixes plain language modelling into every step (InstructGPT's "PPO-ptx",
Ouyang et al. 2022): the loss adds ``--lm-weight`` times the mean next-token NLL of
``--batch-size`` windows of ``--lm-seq-len`` tokens drawn from TEXT (the text the model was
trained on), which holds perplexity on that text while preferences move what the model says.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from itera.errors import InputError, UsageError
from itera.losses import DPO_LOSSES, dpo_loss, kl_div, kto_loss, reward_accuracy
from itera.preference import Pair, Single, prompt_ids, response_ids, split_pairs, split_singles
from itera.options import flag, nested
from itera.progress import SILENT, Reporter
from itera.artifacts import describe_artifact
from itera.record import Outcome
from itera.train import Dist, TrainOptions


@dataclass
class Encoded:
    ids: torch.Tensor  # (n, 2, T) chosen and rejected, right-padded
    mask: torch.Tensor  # (n, 2, T) 1 where the token is a response token to score
    lengths: torch.Tensor  # (n, 2)


def _encode_rows(rows: list[list[tuple[list[int], int]]]) -> Encoded:
    """(n, k, T) right-padded ids, the response mask and lengths from n rows of k (ids, prompt length)."""
    k = len(rows[0]) if rows else 2
    T = max((len(s) for sides in rows for s, _ in sides), default=1)
    ids = torch.zeros(len(rows), k, T, dtype=torch.long)
    mask = torch.zeros(len(rows), k, T)
    lengths = torch.zeros(len(rows), k, dtype=torch.long)
    for i, sides in enumerate(rows):
        for j, (s, n_prompt) in enumerate(sides):
            ids[i, j, : len(s)] = torch.tensor(s)
            mask[i, j, n_prompt: len(s)] = 1
            lengths[i, j] = len(s)
    return Encoded(ids, mask, lengths)


def encode_pairs(tok, pairs: list[Pair], max_len: int) -> tuple[Encoded, list[str]]:
    """Token ids of prompt+response for both sides; responses are scored, prompts masked.
    Pairs longer than ``max_len`` are dropped (reasons returned)."""
    rows, drops = [], []
    for p in pairs:
        prompt = prompt_ids(tok, p.prompt, p.chat)
        sides = [(prompt + response_ids(tok, resp, end), len(prompt))
                 for resp, end in ((p.chosen, p.chosen_end), (p.rejected, p.rejected_end))]
        if max(len(s) for s, _ in sides) > max_len:
            drops.append("longer than the model's context")
            continue
        if min(len(s) - n for s, n in sides) < 1:
            drops.append("empty response")
            continue
        rows.append(sides)
    return _encode_rows(rows), drops


@dataclass
class EncodedSingles:
    enc: Encoded  # (n, 1, T)
    desirable: torch.Tensor  # (n,) bool
    prompts: list  # token ids of each prompt, and of each response: the mismatched pairs' parts
    responses: list
    max_len: int

    @property
    def n(self) -> int:
        return int(self.enc.ids.shape[0])

    def mismatched(self, idx: torch.Tensor) -> Encoded:
        """Each prompt of the batch ``idx`` with the next example's response (cut to fit the context):
        the pairs KTO's reference point is estimated on."""
        rows = []
        order = idx.tolist()
        for a, b in zip(order, order[1:] + order[:1]):
            prompt, resp = self.prompts[a], self.responses[b]
            resp = resp[: max(1, self.max_len - len(prompt))]
            rows.append([((prompt + resp)[: self.max_len], len(prompt))])
        return _encode_rows(rows)


def encode_singles(tok, singles: list[Single], max_len: int) -> tuple[EncodedSingles, list[str]]:
    rows, drops, prompts, responses, good = [], [], [], [], []
    for x in singles:
        prompt, resp = prompt_ids(tok, x.prompt, x.chat), response_ids(tok, x.response, x.end)
        if len(prompt) + len(resp) > max_len:
            drops.append("longer than the model's context")
            continue
        if not resp:
            drops.append("empty response")
            continue
        rows.append([(prompt + resp, len(prompt))])
        prompts.append(prompt)
        responses.append(resp)
        good.append(x.desirable)
    return EncodedSingles(_encode_rows(rows), torch.tensor(good, dtype=torch.bool), prompts, responses,
                          max_len), drops


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
            out.append(sequence_logprobs(model, ids, mask).view(-1, enc.ids.shape[1]))
    return torch.cat(out) if out else torch.zeros(0, enc.ids.shape[1], device=enc.ids.device)


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
def mismatched_kl(model, singles: EncodedSingles, idx: torch.Tensor) -> torch.Tensor:
    """KTO's reference point before clamping: the mean ``log pi - log ref`` over the batch's
    mismatched prompt/completion pairs (no gradient, as the paper and TRL hold it)."""
    from itera.lora import adapters_disabled

    mm = singles.mismatched(idx.cpu())
    dev = singles.enc.ids.device
    ids, mask = mm.ids[:, 0].to(dev), mm.mask[:, 0].to(dev)
    pol = sequence_logprobs(model, ids, mask)
    with adapters_disabled(model):
        ref = sequence_logprobs(model, ids, mask)
    return (pol - ref).mean()


@torch.no_grad()
def evaluate_singles(model, s: EncodedSingles, ref: torch.Tensor, beta: float, w_d: float, w_u: float) -> dict:
    """Held-out single responses: mean reward ``beta (log pi - log ref)`` of the desirable and of the
    undesirable ones, their margin, and the KTO loss (reference point from the whole set, rolled by one)."""
    pol = torch.cat([sequence_logprobs(model, s.enc.ids[i:i + 16, 0], s.enc.mask[i:i + 16, 0])
                     for i in range(0, s.n, 16)])
    kl = mismatched_kl(model, s, torch.arange(s.n))
    loss, f = kto_loss(pol, ref[:, 0], s.desirable, kl, beta, w_d, w_u)
    r, good = f["rewards"], f["desirable"]
    d = r[good].mean().item() if good.any() else None
    u = r[~good].mean().item() if (~good).any() else None
    return {"loss": loss.item(), "desirable_reward": d, "undesirable_reward": u,
            "reward_margin": d - u if d is not None and u is not None else None, "kl_reference_point": f["z0"].item(),
            "examples": s.n, "desirable": int(good.sum()), "undesirable": int((~good).sum())}


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


LOSSES = ("auto", *DPO_LOSSES, "kto")


@dataclass
class DPOOptions:
    model: Path = flag("--model")  # the CLI's default: the artifact of the record on stdin
    out: Path = flag("--out")
    pairs: Path | None = flag("--pairs", default=None)
    feedback: Path | None = flag("--feedback", default=None)
    # itera serve's store of responses and feedback (the CLI reads `default` as the server's default store)
    feedback_db: Path | str | None = flag("--feedback-db", default=None)  # a SQLite file or a PostgreSQL URL
    # with --feedback-db: only the feedback on responses of registry version N, or posted since a time
    from_version: int | None = flag("--from-version", default=None)
    since: str | None = flag("--since", default=None)  # ISO 8601 (UTC unless it says otherwise)
    beta: float = flag("--beta", default=0.1)
    # auto: pairs with DPO (sigmoid), responses judged alone with KTO; sigmoid/ipo: pairs only; kto: every example alone
    loss: str = flag("--loss", default="auto")
    desirable_weight: float = flag("--desirable-weight", default=1.0)
    undesirable_weight: float = flag("--undesirable-weight", default=1.0)
    rating_threshold: float | None = flag("--rating-threshold", default=None)  # None: the middle of the ratings seen
    label_smoothing: float = flag("--label-smoothing", default=0.0)
    # language modelling mixed into every step (PPO-ptx): a data spec (file, pydocs@train, hub name)
    lm_data: str | None = flag("--lm-data", default=None)
    lm_weight: float = flag("--lm-weight", default=1.0)
    lm_seq_len: int = flag("--lm-seq-len", default=128)
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
        if (self.from_version is not None or self.since is not None) and self.feedback_db is None:
            raise UsageError("--from-version and --since choose feedback in the serving store; pass --feedback-db")
        if self.since is not None:
            parse_since(self.since)
        if not self.beta > 0:
            raise UsageError(f"--beta must be positive (got {self.beta})")
        if self.loss not in LOSSES:
            raise UsageError(f"unknown --loss {self.loss!r}; use auto, sigmoid, ipo or kto")
        for name, w in (("--desirable-weight", self.desirable_weight), ("--undesirable-weight", self.undesirable_weight)):
            if not (w > 0 and math.isfinite(w)):
                raise UsageError(f"{name} must be a positive number (got {w})")
        if self.rating_threshold is not None and not math.isfinite(self.rating_threshold):
            raise UsageError(f"--rating-threshold must be a finite number (got {self.rating_threshold})")
        if self.loss == "kto" and self.train.batch_size < 2:
            raise UsageError("--loss kto needs --batch-size 2 or more: its reference point is estimated from the "
                             "batch's mismatched prompt/completion pairs")
        if not (self.lm_weight > 0 and math.isfinite(self.lm_weight)):
            raise UsageError(f"--lm-weight must be a positive number (got {self.lm_weight})")
        if self.lm_seq_len < 2:
            raise UsageError(f"--lm-seq-len must be at least 2 (got {self.lm_seq_len})")
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
        from itera.data import local_path

        db = None if pg.is_url(self.feedback_db) else self.feedback_db
        lm = local_path(self.lm_data) if self.lm_data is not None else None
        return [Path(p) for p in (self.model, self.pairs, self.feedback, db, lm) if p is not None]

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


def parse_since(text: str):
    """--since as an aware UTC datetime; a time without a zone is UTC."""
    import datetime as dt

    try:
        t = dt.datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        raise UsageError(f"--since {text!r} is not a time; pass ISO 8601, e.g. 2026-12-01 or "
                         "2026-12-01T09:30:00Z") from None
    return t if t.tzinfo else t.replace(tzinfo=dt.timezone.utc)


def store_events(opts: DPOOptions, tok) -> tuple[list[dict], dict]:
    """The serving store's events this run trains on, and their provenance for the record.

    --from-version / --since narrow them; then every response they name must have been produced
    with this model's tokenizer (its fingerprint, stored per response since the store's schema 2):
    feedback on another vocabulary's tokens is refused, naming the versions it came from. Responses
    stored before fingerprints were kept cannot be checked: counted as ``tokenizer_unchecked``."""
    from collections import Counter

    from itera.feedback import read_events
    from itera.pg import mask as pg_mask
    from itera.tokenizer import fingerprint

    events = read_events(opts.feedback_db)
    total = len(events)
    if opts.from_version is not None:
        events = [ev for ev in events if ev.get("version") == opts.from_version]
    if opts.since is not None:
        since = parse_since(opts.since)
        events = [ev for ev in events if parse_since(ev["created_at"]) >= since]
    where = pg_mask(opts.feedback_db)
    if not events:
        narrowed = " after --from-version/--since" if total else ""
        raise UsageError(f"no feedback in {where}{narrowed} ({total} events in all); post feedback to the server's "
                         "/v1/feedback, or widen --from-version/--since")
    ours = fingerprint(tok)
    foreign: Counter = Counter()
    unchecked = 0
    for ev in events:
        prints = [ev.get("tokenizer")] + ([ev.get("b_tokenizer")] if ev.get("type") == "ab" else [])
        if any(fp is not None and fp != ours for fp in prints):
            foreign[(ev.get("model"), ev.get("version"))] += 1
        elif any(fp is None for fp in prints):
            unchecked += 1
    if foreign:
        (model, version), n = foreign.most_common(1)[0]
        which = f"version {version} of {model}" if version is not None else model
        raise InputError(f"{sum(foreign.values())} feedback events in {where} are on responses from a model with "
                         f"another tokenizer ({n} from {which}); they cannot tune {opts.model}: pass --from-version N "
                         "(a version served with this model's tokenizer) or another --feedback-db")
    sources = Counter((ev.get("model"), ev.get("version"), ev.get("sha256")) for ev in events)
    prov = {"store": where, "events": len(events), "events_in_store": total, "from_version": opts.from_version,
            "since": opts.since, "tokenizer_unchecked": unchecked,
            "versions": [{"model": m, "version": v, "sha256": sha, "events": n}
                         for (m, v, sha), n in sorted(sources.items(), key=lambda x: (str(x[0][0]), x[0][1] or -1))]}
    return events, prov


# --------------------------------------------------------------------------- phases


MIN_HELD = 10  # held-out pairs below which a reward accuracy says little (one pair is 10 points)


@dataclass
class PairData:
    pairs: list[Pair]  # every usable pair (what --save-pairs writes, with the singles)
    train: Encoded
    held: Encoded
    dropped: dict[str, int]
    heldout_note: str | None = None  # why there is no held-out evaluation, when there is none
    singles: list[Single] = field(default_factory=list)
    train_singles: EncodedSingles | None = None  # None: no response judged alone
    held_singles: EncodedSingles | None = None
    rating_threshold: float | None = None
    feedback: dict | None = None  # with --feedback-db: which served versions the events came from

    @property
    def n_pairs(self) -> int:
        return int(self.train.ids.shape[0])

    @property
    def n_singles(self) -> int:
        return self.train_singles.n if self.train_singles is not None else 0


def response_ends(data: PairData) -> dict[str, int]:
    """How the responses used (both sides of every pair, every single; training and held out) end:
    on an end-of-turn token, on a stop string (scored with it), or cut (nothing scored after)."""
    ends = [e for p in data.pairs for e in (p.chosen_end, p.rejected_end)] + [x.end for x in data.singles]
    return {"end_token": sum(isinstance(e, int) for e in ends), "stop_string": sum(isinstance(e, str) for e in ends),
            "cut": sum(e is None for e in ends)}


def gather_examples(opts: DPOOptions, events: list[dict] | None = None) -> tuple[list[Pair], list[Single], dict, float | None]:
    """(pairs, singles, dropped, rating threshold) from --pairs, a feedback file or the store's ``events``."""
    from itera.preference import _lines, as_singles, default_threshold, examples_from_events, read_examples

    mode = {"auto": "auto", "kto": "kto"}.get(opts.loss, "pairs")
    if opts.pairs is not None:
        pairs, singles = read_examples(opts.pairs)
        if mode == "pairs" and singles:
            raise UsageError(f"{opts.pairs} holds responses judged alone (\"desirable\" lines); --loss {opts.loss} "
                             "trains pairs only: use --loss auto or kto")
        if mode == "kto":
            singles = [x for p in pairs for x in as_singles(p)] + singles
            pairs = []
        return pairs, singles, {}, None
    if events is None:
        events = [ev for _, ev in _lines(opts.feedback)]
    threshold = default_threshold(events, opts.rating_threshold) if mode != "pairs" else None
    pairs, singles, dropped = examples_from_events(events, mode, opts.min_rating_gap, threshold)
    return pairs, singles, dropped, threshold


def load_pairs(opts: DPOOptions, tok, max_len: int, events: list[dict] | None = None) -> PairData:
    """Pairs (and responses judged alone) from --pairs, a feedback file or the serving store's
    ``events``, split and tokenized; what was dropped and why."""
    source = opts.pairs or opts.feedback
    provenance = None
    if source is None:
        from itera.pg import mask as pg_mask

        source = f"the feedback in {pg_mask(opts.feedback_db)}"
        if events is None:
            events, provenance = store_events(opts, tok)
    pairs, singles, dropped, threshold = gather_examples(opts, events)
    if not pairs and not singles:
        what = "preference pairs" if opts.loss in DPO_LOSSES else "examples (pairs or judged responses)"
        raise UsageError(f"{source} gives no usable {what} (dropped: {dropped})")
    train_pairs, held_pairs = split_pairs(pairs, opts.holdout, opts.train.seed)
    train_singles, held_singles = split_singles(singles, opts.holdout, opts.train.seed)
    n_held = len(held_pairs) + len(held_singles)
    if opts.holdout > 0 and not n_held:
        total = len(pairs) + len(singles)
        dropped_note = (f"the held-out split is empty: {opts.holdout:g} of {total} examples rounds to none; about "
                        f"{math.ceil(MIN_HELD / opts.holdout)} give {MIN_HELD} held out, the least that says "
                        "anything")
    else:
        dropped_note = None
    if not train_pairs and not train_singles:
        raise UsageError("no examples left for training after the held-out split; pass more or --holdout 0")
    enc_train, d1 = encode_pairs(tok, train_pairs, max_len)
    enc_held, d2 = encode_pairs(tok, held_pairs, max_len)
    s_train, d3 = encode_singles(tok, train_singles, max_len)
    s_held, d4 = encode_singles(tok, held_singles, max_len)
    for reason in d1 + d2 + d3 + d4:
        dropped[reason] = dropped.get(reason, 0) + 1
    if enc_train.ids.shape[0] == 0 and s_train.n == 0:
        raise UsageError("every training example was dropped (" + ", ".join(dropped) + ")")
    why = ("--batch-size 1 (KTO estimates its reference point from a batch's mismatched pairs)"
           if opts.train.batch_size < 2 else "only one (KTO's reference point needs another to mismatch)"
           if s_train.n == 1 else None)
    if s_train.n and why:
        if opts.loss == "kto" or enc_train.ids.shape[0] == 0:
            raise UsageError(f"responses judged alone train with KTO, which cannot run on {why}; pass "
                             "--batch-size 2 or more, or collect more feedback")
        # --loss auto with pairs to train: the judged responses are dropped, counted, and the pairs train
        dropped[f"judged alone, not trained: {why}"] = s_train.n + s_held.n
        s_train, s_held = encode_singles(tok, [], max_len)[0], encode_singles(tok, [], max_len)[0]
        singles = []
    return PairData(pairs, enc_train, enc_held, dropped, dropped_note, singles,
                    s_train if s_train.n else None, s_held if s_held.n else None, threshold, provenance)


@dataclass
class Refs:
    """The reference model's log-probabilities: (n, 2) per pair set, (n, 1) per single set."""
    train: torch.Tensor
    held: torch.Tensor
    train_singles: torch.Tensor | None
    held_singles: torch.Tensor | None
    hit: bool


def references(model, data: PairData, ckpt: Path) -> Refs:
    """Reference log-probs of the training and held-out examples (cached by the checkpoint's content
    hash, its tokenizer's and the data's); and whether all were cache hits."""
    from itera.fsio import artifact_digest
    from itera.paths import cache_dir

    ref_dir = cache_dir() / "dpo-ref"
    keys = (artifact_digest(Path(ckpt))[1], tokenizer_digest(ckpt))
    hits = []

    def ref(enc: Encoded | None, k: int):
        if enc is None or enc.ids.shape[0] == 0:
            return torch.zeros(0, k, device=model.lm_head.weight.device)
        values, hit = cached_reference(model, enc, keys[0], ref_dir, keys[1])
        hits.append(hit)
        return values

    out = Refs(ref(data.train, 2), ref(data.held, 2), None, None, False)
    if data.train_singles is not None:
        out.train_singles = ref(data.train_singles.enc, 1)
    if data.held_singles is not None:
        out.held_singles = ref(data.held_singles.enc, 1)
    out.hit = all(hits)
    return out


@dataclass
class Anchor:
    """--lm-data: the text's tokens, the window length, its key in records, and the fixed windows
    the record's NLL before and after training is measured on."""
    ids: torch.Tensor
    seq_len: int
    key: str
    probe: torch.Tensor  # (PROBE_WINDOWS, seq_len + 1)


PROBE_WINDOWS = 16


def load_anchor(opts: DPOOptions, tok, max_positions: int) -> Anchor | None:
    from itera.data import dataset_key, load_text
    from itera.errors import DataError
    from itera.train import calibration_ids

    if opts.lm_data is None:
        return None
    text = load_text(opts.lm_data, purpose="train").text
    ids = torch.tensor(tok.encode(text, add_bos=False), dtype=torch.long)
    seq_len = min(opts.lm_seq_len, max_positions - 1)
    if ids.numel() < seq_len + 2:
        raise DataError(f"--lm-data {opts.lm_data} gives {ids.numel()} tokens; at least --lm-seq-len + 2 = "
                        f"{seq_len + 2} are needed (pass more text or a smaller --lm-seq-len)")
    probe = calibration_ids(ids, PROBE_WINDOWS, seq_len + 1, opts.train.seed)
    return Anchor(ids, seq_len, dataset_key(opts.lm_data, "train"), probe)


def lm_nll(model, windows: torch.Tensor) -> torch.Tensor:
    """Mean next-token NLL (nats) over (B, T + 1) token windows."""
    logits = model(windows[:, :-1]).float()
    return torch.nn.functional.cross_entropy(logits.flatten(0, 1), windows[:, 1:].flatten())


@torch.no_grad()
def probe_nll(model, anchor: Anchor) -> float:
    return lm_nll(model, anchor.probe.to(model.lm_head.weight.device)).item()


def fit(opts: DPOOptions, model, data: PairData, refs: Refs, dist: Dist, reporter: Reporter,
        anchor: Anchor | None = None) -> dict:
    """Train the adapters on random examples per step (a pure function of seed and step): pairs
    with DPO/IPO, responses judged alone with KTO, both (weighted by their shares) under auto; with
    an ``anchor`` (--lm-data), plus --lm-weight times the NLL of windows of its text."""
    from itera.train import Trainer, step_generator

    n_p, n_s = data.n_pairs, data.n_singles
    pair_kind = opts.loss if opts.loss in DPO_LOSSES else "sigmoid"
    share_p = n_p / (n_p + n_s)

    def batch_fn(step: int) -> torch.Tensor:
        """Columns: pair index, single index (each when there are any), the anchor window's start."""
        g = step_generator(opts.train.seed, step)
        cols = [torch.randint(0, n, (opts.train.batch_size,), generator=g) for n in (n_p, n_s) if n]
        if anchor is not None:
            cols.append(torch.randint(0, anchor.ids.numel() - anchor.seq_len, (opts.train.batch_size,), generator=g))
        return cols[0] if len(cols) == 1 else torch.stack(cols, 1)

    def pair_loss(m, idx):
        ids = data.train.ids[idx].flatten(0, 1)
        mask = data.train.mask[idx].flatten(0, 1)
        pol = sequence_logprobs(m, ids, mask).view(-1, 2)
        ref = refs.train[idx]
        loss, f = dpo_loss(pol[:, 0], pol[:, 1], ref[:, 0], ref[:, 1], opts.beta, pair_kind, opts.label_smoothing)
        margin = f["chosen_rewards"] - f["rejected_rewards"]
        return loss, {"reward_accuracy": reward_accuracy(margin), "reward_margin": margin.mean().item()}

    def single_loss(m, idx):
        s = data.train_singles
        pol = sequence_logprobs(m, s.enc.ids[idx, 0], s.enc.mask[idx, 0])
        kl = mismatched_kl(m, s, idx)
        loss, f = kto_loss(pol, refs.train_singles[idx, 0], s.desirable[idx], kl, opts.beta,
                           opts.desirable_weight, opts.undesirable_weight)
        return loss, {"kto_loss": loss.item(), "kl_reference_point": f["z0"].item()}

    def preference_loss(m, idx: torch.Tensor):
        if n_p and n_s:
            lp, logs = pair_loss(m, idx[:, 0])
            ls, logs_s = single_loss(m, idx[:, 1])
            return share_p * lp + (1 - share_p) * ls, {**logs, **logs_s}
        return pair_loss(m, idx) if n_p else single_loss(m, idx)

    def loss_fn(m, idx: torch.Tensor):
        if anchor is None:
            return preference_loss(m, idx)
        pref = idx[:, 0] if idx.shape[1] == 2 else idx[:, :-1]
        loss, logs = preference_loss(m, pref)
        windows = torch.stack([anchor.ids[o: o + anchor.seq_len + 1] for o in idx[:, -1].tolist()])
        nll = lm_nll(m, windows.to(idx.device))
        return loss + opts.lm_weight * nll, {**logs, "lm_nll": nll.item()}

    task = reporter.task("dpo" if not n_s else ("kto" if not n_p else "dpo+kto"), total=opts.train.steps)
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
        lines = [json.dumps(x.as_dict()) + "\n" for x in (*data.pairs, *data.singles)]
        write_text_atomic(Path(opts.save_pairs), "".join(lines))


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
    anchor = load_anchor(opts, tok, cfg.max_position_embeddings)  # a bad --lm-data fails before the work
    data = load_pairs(opts, tok, cfg.max_position_embeddings)
    held = data.held.ids.shape[0] > 0
    held_s = data.held_singles is not None
    reporter.log(f"pairs: {data.n_pairs} train, {data.held.ids.shape[0]} held out; responses judged alone: "
                 f"{data.n_singles} train, {data.held_singles.n if held_s else 0} held out; "
                 f"dropped {sum(data.dropped.values())}")
    if data.heldout_note:
        reporter.log(data.heldout_note)
    for enc in (data.train, data.held) + tuple(x.enc for x in (data.train_singles, data.held_singles) if x):
        enc.ids, enc.mask, enc.lengths = enc.ids.to(dist.device), enc.mask.to(dist.device), enc.lengths.to(dist.device)
    for x in (data.train_singles, data.held_singles):
        if x is not None:
            x.desirable = x.desirable.to(dist.device)
    model, _ = load_model(opts.model, device=dist.device)
    add_lora(model, opts.targets, opts.lora_rank, opts.lora_alpha, opts.lora_dropout, seed=opts.train.seed)
    refs = references(model, data, Path(opts.model))
    model.eval()
    lm_before = probe_nll(model, anchor) if anchor is not None else None
    pair_kind = opts.loss if opts.loss in DPO_LOSSES else "sigmoid"
    score = lambda enc, ref: evaluate_pairs(model, enc, ref, opts.beta, pair_kind, opts.label_smoothing)  # noqa: E731
    score_s = lambda s, ref: evaluate_singles(model, s, ref, opts.beta, opts.desirable_weight,  # noqa: E731
                                              opts.undesirable_weight)
    before = score(data.held, refs.held) if held else None
    before_s = score_s(data.held_singles, refs.held_singles) if held_s else None
    stats = fit(opts, model, data, refs, dist, reporter, anchor)
    model.eval()
    kl_enc = data.held if held else (data.held_singles.enc if held_s else None)
    losses = {"pairs": pair_kind if data.n_pairs else None, "singles": "kto" if data.n_singles else None}
    metrics = {
        "train": score(data.train, refs.train) if data.n_pairs else None,
        "heldout": score(data.held, refs.held) if held else None,
        "heldout_before": before, "kl_to_reference": kl_to_reference(model, kl_enc) if kl_enc is not None else None,
        "pairs_used": data.n_pairs, "pairs_heldout": int(data.held.ids.shape[0]),
        "singles_used": data.n_singles, "singles_heldout": data.held_singles.n if held_s else 0,
        "train_singles": score_s(data.train_singles, refs.train_singles) if data.n_singles else None,
        "heldout_singles": score_s(data.held_singles, refs.held_singles) if held_s else None,
        "heldout_singles_before": before_s,
        "losses": losses, "rating_threshold": data.rating_threshold, "feedback_provenance": data.feedback,
        "pairs_dropped": sum(data.dropped.values()), "dropped_reasons": data.dropped,
        "response_ends": response_ends(data),
        "heldout_note": data.heldout_note,
        "reference_cache_hit": bool(refs.hit),
        "train_seconds": stats["train_seconds"], "first_loss": stats["first_loss"], "final_loss": stats["final_loss"],
        "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "lm_anchor": None if anchor is None else {
            "data": anchor.key, "tokens": int(anchor.ids.numel()), "weight": opts.lm_weight,
            "seq_len": anchor.seq_len, "nll_before": lm_before, "nll_after": probe_nll(model, anchor),
            "measured_on": f"{PROBE_WINDOWS} windows of {anchor.seq_len + 1} tokens drawn once from the text (the "
                           "same before and after training)"},
    }
    params = {**opts.as_params(), "train": opts.train.as_params(), "processes": dist.world}
    artifact = None
    if dist.main:  # under torchrun only rank 0 writes
        write(opts, model, data, params, dtype)
        if opts.merge:
            # the held-out figures above are the adapter's on the base in float32; these are merged/'s, as saved
            metrics.update(merged_dtype=dtype, merged_dtype_reason=dtype_reason,
                           heldout_merged=score(data.held, refs.held) if held else None,
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
