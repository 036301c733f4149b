"""``itera distill``: knowledge distillation (Hinton et al. 2015) from a teacher checkpoint into a
smaller student, or training from scratch without a teacher.

The recipe, in phases: :func:`plan` (teacher config, student shape, initialisation; cheap),
:func:`prepare_data` (text, tokenizer, token ids), :func:`build_models` (teacher, student by
random init, layer copy or pruning), :func:`fit` (the shared Trainer with :class:`DistillLoss`),
:func:`heldout_metrics` and :func:`write`. Components live elsewhere: the loss in
:mod:`itera.losses`, student shapes in :mod:`itera.student`, pruning in :mod:`itera.prune`.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from itera.data import describe_heldout
from itera.errors import DataError, UsageError
from itera.losses import DIVERGENCES, DistillLoss, SparseDistillLoss, kl_div
from itera.model.config import ModelConfig
from itera.model.llama import LlamaForCausalLM
from itera.options import flag, nested
from itera.progress import SILENT, Reporter
from itera.artifacts import describe_artifact
from itera.record import Outcome
from itera.student import INITS, StudentSpec, check_student_fits, same_width
from itera.train import Dist, TrainOptions


@dataclass
class DistillOptions:
    """Everything ``itera distill`` was asked to do; written next to the student as distill_config.json."""

    data: str = flag("--data")
    out: Path = flag("--out")
    teacher: Path | None = flag("--teacher", default=None)  # the CLI's default: the record on stdin, if any
    student: str | None = flag("--student", default=None)  # preset name or YAML path
    layers: int | None = flag("--layers", default=None)
    hidden: int | None = flag("--hidden", default=None)
    heads: int | None = flag("--heads", default=None)
    kv_heads: int | None = flag("--kv-heads", default=None)
    ffn: int | None = flag("--ffn", default=None)
    # random | layers | prune; default: layers if widths match, else prune
    init: str | None = flag("--init", default=None)
    # teacher layers to keep; default evenly spaced (the CLI parses --layer-ids 0,2,5)
    layer_ids: list[int] | None = flag("--layer-ids", default=None)
    alpha: float = flag("--alpha", default=0.5)
    temperature: float = flag("--temperature", default=2.0)
    # forward: KL(teacher || student); reverse: KL(student || teacher); jsd: generalized Jensen-Shannon
    kl: str = flag("--kl", default="forward")
    jsd_beta: float = flag("--jsd-beta", default=0.5)  # --kl jsd's mixture weight
    # weight of the hidden-state term (student layer i vs teacher layer layer_ids[i]); 0: off, nothing captured
    hidden_weight: float = flag("--hidden-weight", default=0.0)
    # the teacher's top-K distribution per position, built once (itera distill cache) and reused
    teacher_cache: Path | None = flag("--teacher-cache", default=None)
    # the sparse loss over the teacher's top K (+ the rest); with a cache: at most the cache's K
    top_k: int | None = flag("--top-k", default=None)
    # tokenizer.json path or bpe:VOCAB_SIZE (training from scratch)
    tokenizer: str | None = flag("--tokenizer", default=None)
    holdout: float = flag("--holdout", default=0.05)  # fraction of the text (its tail) held out for evaluation
    eval_tokens: int = flag("--eval-tokens", default=8192)
    calib_batches: int = flag("--calib-batches", default=8)  # batches used to rank importance for --init prune
    resume: bool = flag("--resume", default=False)
    device: str = flag("--device", default="cpu", cli_default="auto",
                       why="the CLI resolves auto (cuda when available) for its process and sets the field")
    force: bool = flag("--force", default=False)
    text_field: str = flag("--text-field", default="text")
    threads: int | None = flag("--threads", default=None)  # torch's CPU threads; None: torch's own default
    # auto: the teacher's stored dtype (float32 without a teacher); training runs in float32 regardless
    save_dtype: str = flag("--save-dtype", default="auto")
    # the command's own defaults: 200 steps at lr 1e-3 after 10 warm-up steps
    train: TrainOptions = nested(default_factory=lambda: TrainOptions(steps=200, lr=1e-3, warmup_steps=10))

    def validate(self) -> "DistillOptions":
        from itera.model.checkpoint import check_save_dtype

        self.train.validate()
        self.save_dtype = check_save_dtype(self.save_dtype)
        if not 0 <= self.alpha <= 1:
            raise UsageError(f"--alpha must be between 0 and 1 (got {self.alpha})")
        if not self.temperature > 0:
            raise UsageError(f"--temperature must be positive (got {self.temperature})")
        if self.kl not in DIVERGENCES:
            raise UsageError(f"--kl must be forward, reverse or jsd (got {self.kl!r})")
        if not 0 < self.jsd_beta < 1:
            raise UsageError(f"--jsd-beta must be between 0 and 1 (got {self.jsd_beta})")
        if not (math.isfinite(self.hidden_weight) and self.hidden_weight >= 0):
            raise UsageError(f"--hidden-weight must be 0 or more (got {self.hidden_weight})")
        if self.hidden_weight > 0 and self.teacher is None:
            raise UsageError("--hidden-weight > 0 needs a --teacher: its layers' hidden states are the targets")
        if self.hidden_weight > 0 and (self.teacher_cache is not None or self.top_k is not None):
            raise UsageError("--hidden-weight > 0 needs the live teacher's hidden states every step, which a "
                             "--teacher-cache or --top-k run does not compute; use one or the other")
        if self.top_k is not None and self.top_k < 1:
            raise UsageError(f"--top-k must be at least 1 (got {self.top_k})")
        if self.top_k is not None and self.teacher is None and self.teacher_cache is None:
            raise UsageError("--top-k cuts a teacher's distribution; pass --teacher or --teacher-cache")
        if self.teacher_cache is not None and self.teacher is None:
            if self.tokenizer is not None:
                raise UsageError("a student of a --teacher-cache uses the tokenizer stored in the cache; drop "
                                 "--tokenizer")
            if self.init in ("layers", "prune"):
                raise UsageError(f"--init {self.init} starts from the teacher's weights, which a cache does not "
                                 "hold; pass --teacher too, or --init random")
        if not 0 < self.holdout < 0.5:
            raise UsageError(f"--holdout must be between 0 and 0.5 (got {self.holdout})")
        if self.init is not None and self.init not in INITS:
            raise UsageError(f"unknown --init {self.init!r}; use random, layers or prune")
        if self.teacher is None and self.teacher_cache is None:
            if self.alpha > 0:
                raise UsageError("--alpha > 0 needs a --teacher; pass --alpha 0 to train from scratch")
            if self.tokenizer is None:
                raise UsageError("training without a teacher needs --tokenizer FILE or --tokenizer bpe:VOCAB_SIZE")
            if self.init in ("layers", "prune"):
                raise UsageError(f"--init {self.init} starts from a teacher; pass --teacher or --init random")
        if self.tokenizer and self.tokenizer.startswith("bpe:"):
            n = self.tokenizer[4:]
            if not n.isdigit() or int(n) < 260:
                raise UsageError(f"--tokenizer bpe:N needs N >= 260 (256 bytes + special tokens), got {self.tokenizer!r}")
            if self.teacher is not None:
                raise UsageError("students share the teacher's tokenizer; drop --tokenizer bpe:N when --teacher is given")
        if self.threads is not None and self.threads < 1:
            raise UsageError(f"--threads must be at least 1 (got {self.threads})")
        if self.eval_tokens < 1 or self.calib_batches < 1:
            raise UsageError("--eval-tokens and --calib-batches must be at least 1")
        explicit = (self.layers, self.hidden, self.heads)
        if self.teacher is None and self.student is None and None in explicit:
            raise UsageError("pass --student PRESET or --layers/--hidden/--heads for the model to train")
        if self.teacher is not None and self.student is None and not any((*explicit, self.kv_heads, self.ffn)):
            raise UsageError("pass --student PRESET (e.g. half, quarter) or explicit --layers/--hidden/--heads")
        return self

    def spec(self) -> StudentSpec:
        base = StudentSpec.from_preset(self.student) if self.student else StudentSpec()
        return base.merged(layers=self.layers, hidden=self.hidden, heads=self.heads, kv_heads=self.kv_heads, ffn=self.ffn)

    def inputs(self) -> list[Path]:
        from itera.data import local_path

        tok = Path(self.tokenizer) if self.tokenizer and not self.tokenizer.startswith("bpe:") else None
        cache = self.teacher_cache if self.teacher_cache is not None and self.teacher_cache.exists() else None
        return [p for p in (self.teacher, local_path(self.data), tok, cache) if p is not None]

    def outputs(self) -> list:
        from itera.fsio import Output

        # a resumed run replaces the student it wrote before (extending a finished run)
        outs = [Output(self.out, "dir", "--out", self.force or self.resume)]
        if self.teacher_cache is not None and not self.teacher_cache.exists():  # built by this run
            outs.append(Output(self.teacher_cache, "dir", "--teacher-cache", False))
        if self.train.save_every or self.resume:
            # OUT.train-state is written into (state.pt), never replaced: checked as an output all the
            # same, so that a symlink there cannot lead the state into an input (the teacher)
            outs.append(Output(self.state_dir, "dir", "--out's training state", True))
        return outs

    @property
    def state_dir(self) -> Path:
        """Where resumable checkpoints go: ``OUT.train-state``."""
        return Path(str(self.out) + ".train-state")

    def as_params(self) -> dict:
        d = asdict(self)
        d.pop("train")
        d["out"], d["teacher"] = str(self.out), (str(self.teacher) if self.teacher else None)
        d["teacher_cache"] = str(self.teacher_cache) if self.teacher_cache else None
        return d


# --------------------------------------------------------------------------- phases


@dataclass
class Plan:
    """What the student will be, decided from the teacher's config alone (no weights read)."""

    teacher_cfg: ModelConfig | None
    spec: StudentSpec
    init: str
    keep: list[int]
    teacher_dtype: str | None = None  # the dtype the teacher's weights are stored in
    cache: object | None = None  # an existing --teacher-cache (itera.teacher_cache.TeacherCache), manifest read
    shape_cfg: ModelConfig | None = None  # a cache's teacher config: what --student presets scale without --teacher


def save_dtype(opts: DistillOptions, p: Plan) -> tuple[str, str]:
    """The dtype the student is written in, and why: --save-dtype, else the teacher's stored dtype
    (a float16 teacher gives a float16 student, not one twice its size), else float32."""
    if opts.save_dtype != "auto":
        return opts.save_dtype, f"--save-dtype {opts.save_dtype}"
    if p.teacher_dtype is None:
        return "float32", "trained from scratch: no source dtype to keep"
    return p.teacher_dtype, "the teacher's stored dtype (--save-dtype auto)"


def plan(opts: DistillOptions) -> Plan:
    """Check the teacher's config against its weights and the student's shape against the teacher."""
    from itera.model.checkpoint import load_checked_config
    from itera.prune import evenly_spaced

    from itera.model.checkpoint import stored_dtype

    t_cfg, t_headers = load_checked_config(opts.teacher) if opts.teacher is not None else (None, None)
    cache, shape_cfg = None, None
    if opts.teacher_cache is not None and opts.teacher_cache.exists():
        from itera.teacher_cache import TeacherCache

        cache = TeacherCache.open(opts.teacher_cache)
        if t_cfg is None and (opts.teacher_cache / "config.json").is_file():
            shape_cfg = ModelConfig.from_dict(json.loads((opts.teacher_cache / "config.json").read_text()))
    elif opts.teacher_cache is not None and opts.teacher is None:
        raise UsageError(f"--teacher-cache {opts.teacher_cache} does not exist; build it with `itera distill cache`, "
                         "or pass --teacher to build it on the way")
    spec = opts.spec()
    s_cfg = spec.resolve(t_cfg or shape_cfg, (t_cfg or shape_cfg).vocab_size if (t_cfg or shape_cfg) else 1)
    init = opts.init or spec.init
    if init is None:
        init = "random" if t_cfg is None else ("layers" if same_width(t_cfg, s_cfg) else "prune")
    if t_cfg is None:
        if init != "random":
            raise UsageError(f"--init {init} starts from the teacher's weights; pass --teacher")
        return Plan(None, spec, init, [], cache=cache, shape_cfg=shape_cfg)
    t_dtype = stored_dtype(t_cfg, t_headers)
    check_student_fits(t_cfg, s_cfg, init)
    keep = opts.layer_ids or evenly_spaced(t_cfg.num_hidden_layers, s_cfg.num_hidden_layers)
    if init != "random" and (len(keep) != s_cfg.num_hidden_layers
                             or any(not 0 <= i < t_cfg.num_hidden_layers for i in keep)):
        raise UsageError(f"--layer-ids must name {s_cfg.num_hidden_layers} distinct teacher layers in "
                         f"0..{t_cfg.num_hidden_layers - 1} (got {opts.layer_ids})")
    return Plan(t_cfg, spec, init, keep, t_dtype, cache=cache)


@dataclass
class Data:
    description: str
    tokenizer: object
    student_cfg: ModelConfig
    train_ids: torch.Tensor
    held_ids: torch.Tensor
    heldout: dict | None = None  # which characters and tokens are held out (itera.data.heldout_split)
    train_text: str = ""  # what a teacher cache's key hashes


def prepare_data(opts: DistillOptions, p: Plan, reporter: Reporter = SILENT) -> Data:
    """Read the text, split off its held-out tail, tokenize it, and fix the student's config."""
    from itera.data import canonical, heldout_split, load_text, split_heldout

    src = load_text(opts.data, purpose="train", field=opts.text_field)
    train_text, held_text = split_heldout(src.text, opts.holdout)
    tok = _load_tokenizer(opts, train_text, reporter)
    t_cfg = p.teacher_cfg
    if t_cfg is not None and opts.tokenizer is None:
        tok.check_fits(t_cfg.vocab_size, str(opts.teacher))
    elif t_cfg is not None and tok.vocab_size != t_cfg.vocab_size:
        raise UsageError(f"the tokenizer has {tok.vocab_size} tokens but the teacher's vocabulary has "
                         f"{t_cfg.vocab_size}; students share the teacher's tokenizer")
    base = t_cfg or p.shape_cfg
    s_cfg = p.spec.resolve(base, tok.vocab_size if base is None else base.vocab_size, tok.bos_id, tok.eos_id)
    if t_cfg is not None:
        s_cfg.bos_token_id, s_cfg.eos_token_id = t_cfg.bos_token_id, t_cfg.eos_token_id
    train_ids = torch.tensor(tok.encode(train_text, add_bos=False), dtype=torch.long)
    held_ids = torch.tensor(tok.encode(held_text, add_bos=False), dtype=torch.long)
    if train_ids.numel() < opts.train.seq_len + 2:
        raise DataError(f"{opts.data} gives {train_ids.numel()} training tokens; at least --seq-len + 2 = "
                        f"{opts.train.seq_len + 2} are needed (pass more text or a smaller --seq-len)")
    if held_ids.numel() < 2:
        raise DataError(f"{opts.data} leaves {held_ids.numel()} held-out tokens; pass more text or a larger --holdout")
    heldout = heldout_split(canonical(opts.data, purpose="train"), src.text, opts.holdout, train_ids.numel(),
                            held_ids.numel(), None, "training")
    return Data(src.description, tok, s_cfg, train_ids, held_ids, heldout, train_text)


def _load_tokenizer(opts: DistillOptions, train_text: str, reporter: Reporter = SILENT):
    from itera.tokenizer import Tokenizer, train_bpe

    if opts.tokenizer is None and opts.teacher is None:  # a student of a cache alone: the cache's tokenizer
        return Tokenizer.from_dir(opts.teacher_cache / "tokenizer")
    if opts.tokenizer is None:
        return Tokenizer.from_dir(opts.teacher)
    if opts.tokenizer.startswith("bpe:"):
        tok = train_bpe([train_text], vocab_size=int(opts.tokenizer[4:]))
        if tok.vocab_size < int(opts.tokenizer[4:]):
            reporter.log(f"the BPE reached {tok.vocab_size} tokens of the {opts.tokenizer[4:]} asked: {len(train_text):,} "
                         "characters of training text hold no more pairs that occur twice; pass more text for a larger "
                         "vocabulary")
        return tok
    return Tokenizer.from_path(Path(opts.tokenizer))


def build_models(opts: DistillOptions, p: Plan, data: Data, device: str
                 ) -> tuple[LlamaForCausalLM | None, LlamaForCausalLM, dict | None]:
    """(teacher or None, student, pruning plan or None), both models on ``device``."""
    from itera.model.checkpoint import load_model
    from itera.prune import init_from_layers, init_from_pruning
    from itera.train import calibration_ids

    torch.manual_seed(opts.train.seed)
    teacher = None
    if opts.teacher is not None:
        teacher, _ = load_model(opts.teacher, device=device)
        teacher.requires_grad_(False)
    prune_plan = None
    if p.init == "random" or teacher is None:
        student = LlamaForCausalLM(data.student_cfg)
        student.init_weights(seed=opts.train.seed)
    elif p.init == "layers":
        student = init_from_layers(teacher, data.student_cfg, p.keep)
    else:
        rows = min(opts.train.batch_size, 8)
        calib = calibration_ids(data.train_ids, opts.calib_batches * rows, opts.train.seq_len, opts.train.seed)
        student, prune_plan = init_from_pruning(teacher, data.student_cfg, p.keep,
                                                [b.to(device) for b in calib.split(rows)])
    return teacher, student.to(device), prune_plan


@torch.no_grad()
def heldout_metrics(student: LlamaForCausalLM, teacher: LlamaForCausalLM | None, ids: torch.Tensor, seq_len: int,
                    max_tokens: int, device: str = "cpu") -> dict:
    """Perplexity of student (and teacher), KL(teacher || student) and top-1 agreement at T=1
    over non-overlapping windows of the held-out tokens."""
    n_blocks = max(1, min(max_tokens, ids.numel() - 1) // seq_len)
    blocks = [ids[i * seq_len: i * seq_len + seq_len + 1] for i in range(n_blocks)]
    blocks = [b for b in blocks if b.numel() >= 2]
    s_nll = t_nll = kl = agree = 0.0
    count = 0
    for b in blocks:
        x, y = b[None, :-1].to(device), b[None, 1:].to(device)
        s_logp = F.log_softmax(student(x).float(), -1)[0]
        s_nll += -s_logp.gather(-1, y[0, :, None]).sum().item()
        if teacher is not None:
            t_logp = F.log_softmax(teacher(x).float(), -1)[0]
            t_nll += -t_logp.gather(-1, y[0, :, None]).sum().item()
            kl += kl_div(t_logp, s_logp).sum().item()
            agree += (t_logp.argmax(-1) == s_logp.argmax(-1)).sum().item()
        count += y.numel()
    out = {"student_perplexity": math.exp(s_nll / count), "heldout_tokens": count}
    if teacher is not None:
        out.update(teacher_perplexity=math.exp(t_nll / count), kl_to_teacher=kl / count, top1_agreement=agree / count)
    return out


def command_line(opts: DistillOptions, world: int = 1) -> str:
    """The command line of these options: every flag whose value differs from the command's
    default (the teacher as a path, even when it came from a record on stdin), each word quoted
    as a shell needs; under torchrun, the torchrun command."""
    import shlex

    from itera.options import SAME, Flag, declared
    from itera.runtime import resolve_device

    words = ["torchrun", "--nproc-per-node", str(world), "-m", "itera", "distill"] if world > 1 \
        else ["itera", "distill"]
    for d in declared(DistillOptions, instance=DistillOptions(data="", out=Path("."))):
        if not isinstance(d.mark, Flag) or d.mark.argument:
            continue
        value = opts
        for part in d.path.split("."):
            value = getattr(value, part)
        default = d.default if d.mark.cli_default is SAME else d.mark.cli_default
        if d.path == "device" and value == resolve_device("auto"):
            continue  # what --device auto picks here anyway
        if value is None or value is False or value == default:
            continue
        if value is True:
            words.append(d.mark.name)
        elif isinstance(value, (list, tuple)):
            words += [d.mark.name, ",".join(map(str, value))]
        else:
            words += [d.mark.name, str(value)]
    return shlex.join(words)


def interrupted(opts: DistillOptions, trainer, dist: Dist, trained: bool = False) -> Exception:
    """What Ctrl-C at this point kept, and the command that goes on from there (two lines)."""
    from itera.train import Interrupted

    t = opts.train
    where = (f"after training finished (step {trainer.step} of {t.steps}), before the student was written"
             if trained else f"at step {trainer.step} of {t.steps}")
    again = command_line(dataclasses.replace(opts, resume=False), dist.world)
    resume = command_line(dataclasses.replace(opts, resume=True), dist.world)
    if trainer.saved_step is None and opts.resume and (opts.state_dir / "state.pt").is_file():
        return Interrupted(f"interrupted {where}, while resuming; the checkpoint in {opts.state_dir / 'state.pt'} is "
                           f"untouched\nitera: to resume: {resume}")
    if trainer.saved_step is None:
        if not t.save_every:
            return Interrupted(f"interrupted {where}; nothing was kept: without --save-every no checkpoint is "
                               f"written (pass --save-every N to be able to resume)\nitera: to start again: {again}")
        return Interrupted(f"interrupted {where}, before the first checkpoint (step {t.save_every}); nothing was "
                           f"kept\nitera: to start again: {again}")
    return Interrupted(f"interrupted {where}; kept the checkpoint of step {trainer.saved_step} in "
                       f"{opts.state_dir / 'state.pt'} (no student was written to {opts.out})\n"
                       f"itera: to resume from step {trainer.saved_step}: {resume}")


def cache_key(opts: DistillOptions, data: Data) -> dict:
    """The key a --teacher-cache must have for this run (the teacher's hash only when it is given)."""
    from itera.teacher_cache import key_for, teacher_sha256

    return key_for(teacher_sha256(opts.teacher) if opts.teacher is not None else None, data.tokenizer,
                   data.train_text, opts.holdout, opts.text_field, opts.train.seq_len)


def check_cache(opts: DistillOptions, p: Plan, data: Data) -> dict | None:
    """Before any model is loaded: an existing cache must match this run (refused in one line naming
    what differs); returns the key, or None without --teacher-cache."""
    if opts.teacher_cache is None:
        return None
    from itera.teacher_cache import true_vocab

    key = cache_key(opts, data)
    if p.cache is not None:
        p.cache.check(key)
        if p.cache.vocab != true_vocab(data.tokenizer):
            raise UsageError(f"--teacher-cache {opts.teacher_cache} covers {p.cache.vocab} tokens and the tokenizer "
                             f"{true_vocab(data.tokenizer)}; it was built for another tokenizer")
        if opts.top_k is not None and opts.top_k > p.cache.k:
            raise UsageError(f"--top-k {opts.top_k} is more than the {p.cache.k} ids per position --teacher-cache "
                             f"{opts.teacher_cache} holds; pass --top-k {p.cache.k} or less, or build a cache with "
                             "a larger --top-k")
        p.cache.load()  # every shard read and checked before any model is
    return key


def teacher_targets(opts: DistillOptions, p: Plan, data: Data, teacher, key: dict | None, dist: Dist,
                    reporter: Reporter):
    """The sparse loss's teacher: (targets(rows, x), the record's ``teacher_cache`` block or None),
    or (None, None) for the full-vocabulary online loss. A missing cache is built here (rank 0,
    the others wait) from the loaded teacher, then loaded."""
    from itera.teacher_cache import DEFAULT_TOP_K, Targets, TeacherCache, build_cache, summary, torch_teacher, true_vocab
    from itera.train import barrier

    if opts.teacher_cache is None and opts.top_k is None:
        return None, None
    if opts.teacher_cache is None:  # the live teacher cut to K: what a cache would hold
        live = torch_teacher(teacher, opts.top_k, true_vocab(data.tokenizer))
        return (lambda rows, x: Targets(*live(x))), None
    hit = p.cache is not None
    if not hit:
        if dist.main:
            reporter.log(f"teacher cache: building {opts.teacher_cache} (top {opts.top_k or DEFAULT_TOP_K})")
            k = opts.top_k or DEFAULT_TOP_K
            build_cache(opts.teacher_cache, torch_teacher(teacher, k, true_vocab(data.tokenizer)), "torch",
                        opts.teacher, data.tokenizer, data.train_ids, key, k, opts.train.seq_len,
                        min(opts.train.batch_size, 8), dist.device, reporter, tokenizer_dir=opts.teacher,
                        config_from=opts.teacher)
        barrier(dist)
        p.cache = TeacherCache.open(opts.teacher_cache).load()
    cache = p.cache
    block = summary(cache.manifest, opts.teacher_cache, hit)
    block["top_k_used"] = opts.top_k or cache.k
    reporter.log(f"teacher cache: {'reused' if hit else 'built'} {opts.teacher_cache}: {cache.windows:,} windows, "
                 f"top {cache.k}, {block['bytes']:,} bytes")
    return (lambda rows, x: cache.targets(rows, opts.top_k)), block


def fit(opts: DistillOptions, teacher, student, data: Data, dist: Dist, reporter: Reporter, targets=None):
    """Train the student (resuming when asked); returns the loop's figures, the held-out history
    and the trainer. Ctrl-C is turned into :class:`itera.train.Interrupted`, saying what was kept."""
    from itera.train import Trainer

    t = opts.train
    measure = lambda: heldout_metrics(student, None, data.held_ids, t.seq_len, opts.eval_tokens,  # noqa: E731
                                      dist.device)["student_perplexity"]
    student.eval()
    history = [{"step": 0, "student_perplexity": measure()}]

    def on_eval(step: int) -> None:
        history.append({"step": step, "student_perplexity": measure()})
        reporter.log(f"step {step}: held-out perplexity {history[-1]['student_perplexity']:.3f}")

    task = reporter.task("distill", total=t.steps)
    batch_fn, extra = None, None
    hidden_log: list[float] = []
    if targets is not None:  # the sparse loss: batches are numbers of the cache's windows
        from itera.teacher_cache import window_grid
        from itera.train import step_generator

        windows = window_grid(data.train_ids, t.seq_len)
        loss = SparseDistillLoss(windows, targets, data.tokenizer.max_id + 1, opts.alpha, opts.temperature, opts.kl,
                                 opts.jsd_beta)
        batch_fn = lambda step: torch.randint(0, windows.shape[0], (t.batch_size,),  # noqa: E731
                                              generator=step_generator(t.seed, step))
    else:
        keep = None
        if opts.hidden_weight > 0:  # the plan's layer map: --layer-ids, else evenly spaced (as plan() has it)
            from itera.prune import evenly_spaced

            keep = opts.layer_ids or evenly_spaced(teacher.config.num_hidden_layers, student.config.num_hidden_layers)
        loss = DistillLoss(teacher, opts.alpha, opts.temperature, opts.kl, opts.jsd_beta,
                           hidden_weight=opts.hidden_weight, student=student, keep=keep)
        extra = loss.projection

    def on_step(step: int, logs: dict) -> None:
        if "hidden" in logs:
            hidden_log.append(logs["hidden"])
        task.update(step, loss=logs["loss"], tokens_per_s=logs["tokens_per_s"])

    trainer = Trainer(student, loss, data.train_ids, t, dist=dist,
                      state_dir=opts.state_dir if t.save_every or opts.resume else None, on_step=on_step,
                      on_eval=on_eval, batch_fn=batch_fn, extra=extra,
                      extra_name="the hidden-state projection (--hidden-weight > 0)")
    trainer.token_batches = True  # window numbers stand for seq_len tokens each
    try:
        if opts.resume:
            if trainer.load_state():  # run_distill already refused a state past --steps
                reporter.log(f"resumed from step {trainer.step} of {t.steps} ({opts.state_dir})")
            else:
                reporter.log(f"nothing to resume in {opts.state_dir}; starting at step 0")
        stats = trainer.run()
    except KeyboardInterrupt:
        raise interrupted(opts, trainer, dist) from None
    finally:
        task.close()
    if hidden_log:  # the hidden-state term (unweighted), as final_loss is: mean of the last 10 steps run
        stats["final_hidden_loss"] = sum(hidden_log[-10:]) / len(hidden_log[-10:])
    return stats, history, trainer


def write(opts: DistillOptions, student: LlamaForCausalLM, tok, params: dict, prune_plan: dict | None,
          dtype: str = "float32") -> None:
    """Save the student with its tokenizer, resolved options and pruning plan (rank 0 only). The
    resumable state (with --save-every) stays, so that --resume --steps N can extend the run."""
    import tempfile

    from itera.model.checkpoint import save_model

    extra = {"distill_config.json": json.dumps(params, indent=2, default=str) + "\n"}
    if prune_plan is not None:
        extra["prune_plan.json"] = json.dumps(prune_plan) + "\n"
    with tempfile.TemporaryDirectory() as tmp:
        tok_dir = opts.teacher if opts.teacher is not None and opts.tokenizer is None else Path(tmp)
        if opts.teacher is None and opts.teacher_cache is not None:
            tok_dir = opts.teacher_cache / "tokenizer"
        if tok_dir == Path(tmp):
            tok.save(Path(tmp))
        save_model(student, opts.out, tokenizer_from=tok_dir, dtype=dtype, extra_files=extra)


# --------------------------------------------------------------------------- the job


def run_distill(opts: DistillOptions, reporter: Reporter = SILENT, dist: Dist | None = None) -> Outcome:
    """Validate everything cheap, then build the student, train it, measure it, and (on rank 0)
    write it to ``opts.out``."""
    from itera.train import check_resumable, run_fingerprint

    dist = dist or Dist(device=opts.device)
    opts.validate()
    if opts.threads is not None:
        torch.set_num_threads(opts.threads)
    opts.threads = torch.get_num_threads()  # the record says what was used
    opts.train.validate(dist.world)
    p = plan(opts)
    data = prepare_data(opts, p, reporter)
    if opts.resume:
        # a state at exactly --steps is a finished run whose student was never written (Ctrl-C during
        # the last evaluation): resuming it writes the student
        check_resumable(opts.state_dir, run_fingerprint(opts.train, dist.world, data.student_cfg.num_parameters(),
                                                        data.train_ids.numel()), steps=opts.train.steps,
                        finished_ok=not opts.out.exists())
    key = check_cache(opts, p, data)
    reporter.log(f"data: {data.description}: {data.train_ids.numel():,} training and "
                 f"{data.held_ids.numel():,} held-out tokens; held out: {describe_heldout(data.heldout)}")
    teacher, student, prune_plan = build_models(opts, p, data, dist.device)
    c = data.student_cfg
    shape = (f"{c.num_hidden_layers} layers, hidden {c.hidden_size}, {c.num_attention_heads} heads / "
             f"{c.num_key_value_heads} kv, ffn {c.intermediate_size}")
    if teacher is None and opts.teacher_cache is not None:
        reporter.log(f"student: {student.num_parameters():,} parameters ({shape}), init random, taught by "
                     f"{opts.teacher_cache}")
    elif teacher is None:  # no teacher: the model trained here is nobody's student
        reporter.log(f"model: {student.num_parameters():,} parameters ({shape}), trained from scratch")
    else:
        reporter.log(f"student: {student.num_parameters():,} parameters ({shape}), init {p.init}")
    dtype, dtype_reason = save_dtype(opts, p)
    targets, cache_block = teacher_targets(opts, p, data, teacher, key, dist, reporter)
    stats, history, trainer = fit(opts, teacher, student, data, dist, reporter, targets)
    try:
        return _finish(opts, p, data, teacher, student, prune_plan, stats, history, dist, dtype, dtype_reason, reporter,
                       cache_block)
    except KeyboardInterrupt:
        raise interrupted(opts, trainer, dist, trained=True) from None


def _finish(opts: DistillOptions, p: Plan, data: Data, teacher, student, prune_plan, stats: dict, history: list,
            dist: Dist, dtype: str, dtype_reason: str, reporter: Reporter, cache_block: dict | None = None) -> Outcome:
    """Round the student to the dtype it is saved in, measure what is saved, and (rank 0) write it."""
    from itera.model.checkpoint import round_to_dtype, weight_bytes
    from itera.train import barrier

    round_to_dtype(student, dtype, "student")  # the figures below are the saved student's
    final = heldout_metrics(student, teacher, data.held_ids, opts.train.seq_len, opts.eval_tokens, dist.device)
    history.append({"step": opts.train.steps, "student_perplexity": final["student_perplexity"]})
    heldout = {**data.heldout, "tokens_scored": final["heldout_tokens"]}
    c = data.student_cfg
    params = {**opts.as_params(), "init": p.init, "layer_ids": p.keep if p.init != "random" else None,
              "train": opts.train.as_params(), "processes": dist.world, "device": dist.device,
              "student_config": {k: v for k, v in c.to_dict().items() if k != "architectures"}}
    metrics: dict = {"student_params": student.num_parameters(), "tokens_seen": stats["tokens_seen"],
                     "tokens_per_s": stats["tokens_per_s"], "train_seconds": stats["train_seconds"],
                     "eval_seconds": stats["eval_seconds"],
                     "first_loss": stats["first_loss"], "final_loss": stats["final_loss"],
                     "init_student_perplexity": history[0]["student_perplexity"], **final, "eval_history": history,
                     "heldout_split": heldout, "student_dtype": dtype, "student_dtype_reason": dtype_reason,
                     "perplexity_measured_on": f"the student as saved ({dtype}); eval_history's earlier steps on "
                                               "the float32 weights in training"}
    if cache_block is not None:
        metrics["teacher_cache"] = cache_block
    if "final_hidden_loss" in stats:
        metrics["final_hidden_loss"] = stats["final_hidden_loss"]
    if teacher is not None:
        metrics["teacher_params"] = teacher.num_parameters()
        metrics["compression_ratio"] = metrics["teacher_params"] / metrics["student_params"]
    artifact = None
    if dist.main:
        write(opts, student, data.tokenizer, params, prune_plan, dtype)
        metrics["student_bytes"] = weight_bytes(opts.out)
        if opts.teacher is not None:
            metrics["teacher_bytes"] = weight_bytes(opts.teacher)
            metrics["compression_ratio_bytes"] = metrics["teacher_bytes"] / metrics["student_bytes"]
        artifact = describe_artifact(opts.out, "checkpoint", "safetensors")
    barrier(dist)
    return Outcome(artifact, metrics, params, device=dist.device)
