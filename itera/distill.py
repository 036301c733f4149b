"""Knowledge distillation (Hinton et al. 2015) from a teacher checkpoint into a smaller student.

    loss = alpha * T^2 * KL(teacher_T || student_T) + (1 - alpha) * CE(student, next token)

with temperature ``T`` and forward or reverse KL. Logits are computed in chunks of positions
under activation checkpointing, so a long vocabulary never materialises (B, T, V) for the
whole batch in the backward pass.

Students are described by a preset (``configs/students/*.yaml``) or explicit sizes, and start
from random weights, a subset of the teacher's layers, or a structurally pruned teacher: heads,
FFN channels and hidden channels ranked by activation importance on calibration batches
(Minitron: Muralidharan et al. 2024, "Compact Language Models via Pruning and Knowledge
Distillation").
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import torch.nn.functional as F
import yaml

from itera.errors import UsageError
from itera.model.config import ModelConfig
from itera.model.llama import LlamaForCausalLM

PRESET_DIR = Path(__file__).resolve().parent.parent / "configs" / "students"
INITS = ("random", "layers", "prune")


# --------------------------------------------------------------------------- student shapes


@dataclass
class StudentSpec:
    """A student's shape: explicit sizes, or ``depth``/``width`` fractions of the teacher."""

    layers: int | None = None
    hidden: int | None = None
    heads: int | None = None
    kv_heads: int | None = None
    ffn: int | None = None
    depth: float | None = None
    width: float | None = None
    init: str | None = None
    max_position_embeddings: int | None = None
    tie_word_embeddings: bool | None = None

    @classmethod
    def from_preset(cls, preset: str) -> "StudentSpec":
        """A preset name from configs/students/ or a path to a YAML file with these field names."""
        from itera.paths import preset_path

        path = preset_path(preset, PRESET_DIR, "student preset")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise UsageError(f"student preset {path} is not valid YAML: {e}") from None
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise UsageError(f"student preset {path} has unknown field {unknown[0]!r}; fields: {', '.join(sorted(names))}")
        return cls(**data)

    def merged(self, **overrides) -> "StudentSpec":
        return StudentSpec(**{**asdict(self), **{k: v for k, v in overrides.items() if v is not None}})

    def resolve(self, teacher: ModelConfig | None, vocab_size: int, bos: int | None = None,
                eos: int | None = None) -> ModelConfig:
        """The student's ModelConfig: explicit sizes win, fractions scale the teacher.

        With a teacher, the student keeps its head size, rotary settings, norms and biases."""
        t = teacher
        if t is None and (self.depth is not None or self.width is not None):
            raise UsageError("depth/width presets scale a teacher; without --teacher pass "
                             "--layers, --hidden, --heads (and --kv-heads, --ffn)")
        if t is None and None in (self.layers, self.hidden, self.heads):
            raise UsageError("without --teacher the student needs --layers, --hidden and --heads")
        depth, width = self.depth or 1.0, self.width or 1.0
        for name, v in (("depth", depth), ("width", width)):
            if not 0 < v <= 1:
                raise UsageError(f"student {name} must be in (0, 1], got {v}")
        if t is not None:
            heads = self.heads or max(1, round(t.num_attention_heads * width))
            kv = self.kv_heads or _largest_divisor_at_most(heads, max(1, round(t.num_key_value_heads * width)))
            hidden = self.hidden or heads * max(1, round(t.hidden_size * width / heads))
            layers = self.layers or max(1, round(t.num_hidden_layers * depth))
            ffn = self.ffn or max(1, round(t.intermediate_size * width))
            head_dim = t.head_dim
            base = dict(max_position_embeddings=t.max_position_embeddings, rms_norm_eps=t.rms_norm_eps,
                        rope_theta=t.rope_theta, rope_scaling=t.rope_scaling,
                        tie_word_embeddings=t.tie_word_embeddings, model_type=t.model_type,
                        attention_bias=t.attention_bias, qkv_bias=t.qkv_bias, mlp_bias=t.mlp_bias,
                        sliding_window=t.sliding_window)
        else:
            heads, hidden, layers = self.heads, self.hidden, self.layers
            kv = self.kv_heads or heads
            ffn = self.ffn or int(math.ceil(8 * hidden / 3 / 32) * 32)  # Llama's rule: ~8/3 h
            head_dim = hidden // heads if heads > 0 else 0
            base = dict(max_position_embeddings=2048, tie_word_embeddings=False)
        for name, v in (("layers", layers), ("hidden", hidden), ("heads", heads), ("kv-heads", kv), ("ffn", ffn)):
            if v < 1:
                raise UsageError(f"--{name} must be at least 1 (got {v})")
        if hidden % heads:
            raise UsageError(f"--heads ({heads}) must divide --hidden ({hidden})")
        if heads % kv:
            raise UsageError(f"--kv-heads ({kv}) must divide --heads ({heads})")
        if self.max_position_embeddings:
            base["max_position_embeddings"] = self.max_position_embeddings
        if self.tie_word_embeddings is not None:
            base["tie_word_embeddings"] = self.tie_word_embeddings
        return ModelConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=layers,
                           num_attention_heads=heads, num_key_value_heads=kv, head_dim=head_dim,
                           bos_token_id=bos, eos_token_id=eos, **base)


def _largest_divisor_at_most(n: int, k: int) -> int:
    return max(d for d in range(1, min(n, k) + 1) if n % d == 0)


def same_width(t: ModelConfig, s: ModelConfig) -> bool:
    return (t.hidden_size, t.intermediate_size, t.num_attention_heads, t.num_key_value_heads, t.head_dim) == \
        (s.hidden_size, s.intermediate_size, s.num_attention_heads, s.num_key_value_heads, s.head_dim)


def check_student_fits(t: ModelConfig, s: ModelConfig, init: str) -> None:
    """Refuse students that layer copying or pruning cannot make from this teacher."""
    dims = [("layers", s.num_hidden_layers, t.num_hidden_layers), ("hidden", s.hidden_size, t.hidden_size),
            ("heads", s.num_attention_heads, t.num_attention_heads),
            ("kv-heads", s.num_key_value_heads, t.num_key_value_heads), ("ffn", s.intermediate_size, t.intermediate_size),
            ("head-dim", s.head_dim, t.head_dim)]
    if init in ("layers", "prune"):
        for name, sv, tv in dims:
            if sv > tv:
                raise UsageError(f"student {name} {sv} is larger than the teacher's {tv}; --init {init} can only "
                                 "shrink a model (use --init random for a larger student)")
        if s.head_dim != t.head_dim:
            raise UsageError(f"--init {init} keeps the teacher's head size {t.head_dim}, but the student's is "
                             f"{s.head_dim}; choose --hidden/--heads with hidden/heads = {t.head_dim} or --init random")
        if s.num_attention_heads // s.num_key_value_heads > t.num_attention_heads // t.num_key_value_heads:
            raise UsageError(f"--init {init} cannot give {s.num_attention_heads // s.num_key_value_heads} query heads "
                             f"per kv head from a teacher with {t.num_attention_heads // t.num_key_value_heads}; "
                             "keep more --kv-heads")
    if init == "layers" and not same_width(t, s):
        raise UsageError("--init layers copies whole layers, so the student needs the teacher's width (hidden "
                         f"{t.hidden_size}, heads {t.num_attention_heads}, kv-heads {t.num_key_value_heads}, ffn "
                         f"{t.intermediate_size}); use --init prune to shrink width")


def evenly_spaced(n_teacher: int, n_student: int) -> list[int]:
    """Layer indices to keep: first and last included, the rest spread evenly."""
    if n_student == 1:
        return [0]
    return sorted({round(i * (n_teacher - 1) / (n_student - 1)) for i in range(n_student)})


# --------------------------------------------------------------------------- initialisation


def init_from_layers(teacher: LlamaForCausalLM, cfg: ModelConfig, keep: list[int]) -> LlamaForCausalLM:
    """Student with the teacher's embeddings, final norm, head and the layers in ``keep``."""
    student = LlamaForCausalLM(cfg)
    sd = teacher.state_dict()
    new = {}
    for name in student.state_dict():
        if name.startswith("model.layers."):
            i, rest = name[len("model.layers."):].split(".", 1)
            new[name] = sd[f"model.layers.{keep[int(i)]}.{rest}"]
        else:
            new[name] = sd[name]
    student.load_state_dict(new)
    return student


@torch.no_grad()
def importance(teacher: LlamaForCausalLM, batches: list[torch.Tensor]) -> dict:
    """Activation importance (Minitron): mean |activation| per hidden channel (over every RMSNorm
    output), L2 norm per attention head (input of o_proj), mean |activation| per FFN channel."""
    cfg = teacher.config
    hidden = torch.zeros(cfg.hidden_size)
    heads = torch.zeros(cfg.num_hidden_layers, cfg.num_attention_heads)
    ffn = torch.zeros(cfg.num_hidden_layers, cfg.intermediate_size)
    hooks = []

    def on_norm(_m, _inp, out):
        hidden.add_(out.float().abs().flatten(0, -2).mean(0).cpu())

    def on_o_proj(i):
        def hook(_m, inp):
            x = inp[0].float()  # (B, T, nh * hd)
            heads[i].add_(x.unflatten(-1, (cfg.num_attention_heads, cfg.head_dim)).norm(dim=-1).flatten(0, -2).mean(0).cpu())
        return hook

    def on_down_proj(i):
        def hook(_m, inp):
            ffn[i].add_(inp[0].float().abs().flatten(0, -2).mean(0).cpu())
        return hook

    for i, layer in enumerate(teacher.model.layers):
        hooks.append(layer.input_layernorm.register_forward_hook(on_norm))
        hooks.append(layer.post_attention_layernorm.register_forward_hook(on_norm))
        hooks.append(layer.self_attn.o_proj.register_forward_pre_hook(on_o_proj(i)))
        hooks.append(layer.mlp.down_proj.register_forward_pre_hook(on_down_proj(i)))
    hooks.append(teacher.model.norm.register_forward_hook(on_norm))
    try:
        for b in batches:
            teacher(b)
    finally:
        for h in hooks:
            h.remove()
    return {"hidden": hidden, "heads": heads, "ffn": ffn}


def _top(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k largest scores, in ascending index order (keeps the original layout)."""
    return torch.sort(torch.topk(scores, k).indices).values


def init_from_pruning(teacher: LlamaForCausalLM, cfg: ModelConfig, keep_layers: list[int],
                      batches: list[torch.Tensor]) -> tuple[LlamaForCausalLM, dict]:
    """A dense student cut out of the teacher: kept layers, and in each the most important kv
    groups, query heads, FFN channels, plus the most important hidden channels overall."""
    t = teacher.config
    imp = importance(teacher, batches)
    h_keep = _top(imp["hidden"], cfg.hidden_size)
    rep_t, rep_s = t.n_rep, cfg.n_rep
    sd = teacher.state_dict()
    new: dict[str, torch.Tensor] = {}
    new["model.embed_tokens.weight"] = sd["model.embed_tokens.weight"][:, h_keep]
    new["model.norm.weight"] = sd["model.norm.weight"][h_keep]
    if not cfg.tie_word_embeddings:
        new["lm_head.weight"] = sd["lm_head.weight"][:, h_keep]
    plan = {"hidden": h_keep.tolist(), "layers": keep_layers, "heads": [], "ffn_kept": []}
    hd = t.head_dim
    for s_i, t_i in enumerate(keep_layers):
        p, q = f"model.layers.{t_i}.", f"model.layers.{s_i}."
        head_scores = imp["heads"][t_i]  # (nh,)
        groups = _top(head_scores.view(t.num_key_value_heads, rep_t).sum(-1), cfg.num_key_value_heads)
        q_heads = torch.cat([g * rep_t + _top(head_scores[g * rep_t:(g + 1) * rep_t], rep_s) for g in groups])
        q_rows = torch.cat([torch.arange(h * hd, (h + 1) * hd) for h in q_heads])
        kv_rows = torch.cat([torch.arange(g * hd, (g + 1) * hd) for g in groups])
        f_keep = _top(imp["ffn"][t_i], cfg.intermediate_size)
        plan["heads"].append(q_heads.tolist())
        plan["ffn_kept"].append(len(f_keep))
        for proj, rows in (("q_proj", q_rows), ("k_proj", kv_rows), ("v_proj", kv_rows)):
            new[q + f"self_attn.{proj}.weight"] = sd[p + f"self_attn.{proj}.weight"][rows][:, h_keep]
            if p + f"self_attn.{proj}.bias" in sd:
                new[q + f"self_attn.{proj}.bias"] = sd[p + f"self_attn.{proj}.bias"][rows]
        new[q + "self_attn.o_proj.weight"] = sd[p + "self_attn.o_proj.weight"][h_keep][:, q_rows]
        if p + "self_attn.o_proj.bias" in sd:
            new[q + "self_attn.o_proj.bias"] = sd[p + "self_attn.o_proj.bias"][h_keep]
        for proj in ("gate_proj", "up_proj"):
            new[q + f"mlp.{proj}.weight"] = sd[p + f"mlp.{proj}.weight"][f_keep][:, h_keep]
            if p + f"mlp.{proj}.bias" in sd:
                new[q + f"mlp.{proj}.bias"] = sd[p + f"mlp.{proj}.bias"][f_keep]
        new[q + "mlp.down_proj.weight"] = sd[p + "mlp.down_proj.weight"][h_keep][:, f_keep]
        if p + "mlp.down_proj.bias" in sd:
            new[q + "mlp.down_proj.bias"] = sd[p + "mlp.down_proj.bias"][h_keep]
        for norm in ("input_layernorm", "post_attention_layernorm"):
            new[q + f"{norm}.weight"] = sd[p + f"{norm}.weight"][h_keep]
    student = LlamaForCausalLM(cfg)
    student.load_state_dict({k: v.clone() for k, v in new.items()}, strict=not cfg.tie_word_embeddings)
    if cfg.tie_word_embeddings:
        student.lm_head.weight = student.model.embed_tokens.weight
    return student, plan


# --------------------------------------------------------------------------- loss


def _chunk_loss(s_hidden, t_hidden, targets, s_head, t_head, alpha: float, temperature: float, reverse: bool):
    """(sum CE, sum KL) over one chunk of positions. Runs under activation checkpointing."""
    s_logits = F.linear(s_hidden, s_head).float()  # (B, c, V)
    ce = F.cross_entropy(s_logits.flatten(0, 1), targets.flatten(), reduction="sum")
    if alpha == 0:
        return ce, torch.zeros((), device=ce.device)
    with torch.no_grad():
        t_logits = F.linear(t_hidden, t_head).float()
    s_logp = F.log_softmax(s_logits / temperature, dim=-1)
    t_logp = F.log_softmax(t_logits / temperature, dim=-1)
    if reverse:  # KL(student || teacher): mode-seeking
        kl = (s_logp.exp() * (s_logp - t_logp)).sum()
    else:  # KL(teacher || student): mean-seeking, Hinton's choice
        kl = (t_logp.exp() * (t_logp - s_logp)).sum()
    return ce, kl


class DistillLoss:
    """``loss_fn`` for the Trainer: mean over tokens of alpha*T^2*KL + (1-alpha)*CE."""

    def __init__(self, teacher: LlamaForCausalLM | None, alpha: float, temperature: float, reverse: bool = False,
                 chunk: int = 128):
        self.teacher, self.alpha, self.T, self.reverse, self.chunk = teacher, alpha, temperature, reverse, chunk

    def __call__(self, model, batch: torch.Tensor):
        from torch.utils.checkpoint import checkpoint

        x, y = batch[:, :-1], batch[:, 1:]
        s_hidden = model(x, return_hidden=True)  # (B, T, H): through the DDP wrapper when distributed
        student = model.module if hasattr(model, "module") else model
        t_hidden, t_head = None, None
        if self.alpha > 0:
            with torch.no_grad():
                t_hidden = self.teacher(x, return_hidden=True)
            t_head = self.teacher.lm_head.weight
        ce_sum, kl_sum = 0.0, 0.0
        for i in range(0, x.shape[1], self.chunk):
            sl = slice(i, i + self.chunk)
            ce, kl = checkpoint(_chunk_loss, s_hidden[:, sl], None if t_hidden is None else t_hidden[:, sl], y[:, sl],
                                student.lm_head.weight, t_head, self.alpha, self.T, self.reverse, use_reentrant=False)
            ce_sum, kl_sum = ce_sum + ce, kl_sum + kl
        n = y.numel()
        ce_mean, kl_mean = ce_sum / n, kl_sum / n
        loss = self.alpha * self.T ** 2 * kl_mean + (1 - self.alpha) * ce_mean
        return loss, {"ce": float(ce_mean.detach()), "kl": float(kl_mean.detach())}


# --------------------------------------------------------------------------- held-out figures


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
            kl += (t_logp.exp() * (t_logp - s_logp)).sum().item()
            agree += (t_logp.argmax(-1) == s_logp.argmax(-1)).sum().item()
        count += y.numel()
    out = {"student_perplexity": math.exp(s_nll / count), "heldout_tokens": count}
    if teacher is not None:
        out.update(teacher_perplexity=math.exp(t_nll / count), kl_to_teacher=kl / count, top1_agreement=agree / count)
    return out


# --------------------------------------------------------------------------- the job


@dataclass
class DistillOptions:
    """Everything ``itera distill`` was asked to do; written next to the student as distill_config.json."""

    data: str
    out: Path
    teacher: Path | None = None
    student: str | None = None  # preset name or YAML path
    layers: int | None = None
    hidden: int | None = None
    heads: int | None = None
    kv_heads: int | None = None
    ffn: int | None = None
    init: str | None = None  # random | layers | prune; default: layers if widths match, else prune
    layer_ids: list[int] | None = None  # teacher layers to keep; default evenly spaced
    alpha: float = 0.5
    temperature: float = 2.0
    kl: str = "forward"  # forward: KL(teacher || student); reverse: KL(student || teacher)
    tokenizer: str | None = None  # tokenizer.json path or bpe:VOCAB_SIZE (training from scratch)
    holdout: float = 0.05  # fraction of the text (its tail) held out for evaluation
    eval_tokens: int = 8192
    calib_batches: int = 8  # batches used to rank importance for --init prune
    resume: bool = False
    device: str = "cpu"

    def validate(self) -> "DistillOptions":
        if not 0 <= self.alpha <= 1:
            raise UsageError(f"--alpha must be between 0 and 1 (got {self.alpha})")
        if not self.temperature > 0:
            raise UsageError(f"--temperature must be positive (got {self.temperature})")
        if self.kl not in ("forward", "reverse"):
            raise UsageError(f"--kl must be forward or reverse (got {self.kl!r})")
        if not 0 < self.holdout < 0.5:
            raise UsageError(f"--holdout must be between 0 and 0.5 (got {self.holdout})")
        if self.init is not None and self.init not in INITS:
            raise UsageError(f"unknown --init {self.init!r}; use random, layers or prune")
        if self.teacher is None:
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
        if self.eval_tokens < 1 or self.calib_batches < 1:
            raise UsageError("--eval-tokens and --calib-batches must be at least 1")
        return self

    def spec(self) -> StudentSpec:
        base = StudentSpec.from_preset(self.student) if self.student else StudentSpec()
        return base.merged(layers=self.layers, hidden=self.hidden, heads=self.heads, kv_heads=self.kv_heads, ffn=self.ffn)

    def as_params(self) -> dict:
        d = asdict(self)
        d["out"], d["teacher"] = str(self.out), (str(self.teacher) if self.teacher else None)
        return d


def _split_text(text: str, holdout: float) -> tuple[str, str]:
    cut = int(len(text) * (1 - holdout))
    return text[:cut], text[cut:]


def _load_tokenizer(opts: DistillOptions, train_text: str):
    from itera.tokenizer import Tokenizer, train_bpe

    if opts.tokenizer is None:
        return Tokenizer.from_dir(opts.teacher)
    if opts.tokenizer.startswith("bpe:"):
        return train_bpe([train_text], vocab_size=int(opts.tokenizer[4:]))
    return Tokenizer.from_path(Path(opts.tokenizer))


def run_distill(opts: DistillOptions, train_opts, dist=None, on_step=None, log=lambda msg: None) -> dict:
    """Validate everything cheap, then build the student, train it, measure it, and (on rank 0)
    write it to ``opts.out``. Returns the record's metrics and the resolved parameters."""
    import tempfile

    from itera.data import load_text
    from itera.errors import DataError
    from itera.model.checkpoint import (check_against_config, load_config, load_model, read_headers,
                                        save_model)
    from itera.train import Dist, Trainer, barrier, check_resumable, run_fingerprint

    dist = dist or Dist()
    opts.validate()
    train_opts.validate(dist.world)
    # --- cheap checks: teacher config and headers, student shape
    t_cfg = None
    if opts.teacher is not None:
        t_cfg = load_config(opts.teacher)
        check_against_config(t_cfg, read_headers(opts.teacher), opts.teacher)
    spec = opts.spec()
    init = opts.init or spec.init
    vocab_guess = t_cfg.vocab_size if t_cfg else 1
    s_cfg = spec.resolve(t_cfg, vocab_guess)
    if init is None:
        init = "random" if t_cfg is None else ("layers" if same_width(t_cfg, s_cfg) else "prune")
    if t_cfg is not None:
        check_student_fits(t_cfg, s_cfg, init)
    keep = opts.layer_ids or (evenly_spaced(t_cfg.num_hidden_layers, s_cfg.num_hidden_layers) if t_cfg else [])
    if t_cfg is not None and init != "random":
        if len(keep) != s_cfg.num_hidden_layers or any(not 0 <= i < t_cfg.num_hidden_layers for i in keep):
            raise UsageError(f"--layer-ids must name {s_cfg.num_hidden_layers} distinct teacher layers in "
                             f"0..{t_cfg.num_hidden_layers - 1} (got {opts.layer_ids})")
    # --- data and tokenizer
    src = load_text(opts.data, purpose="train")
    train_text, held_text = _split_text(src.text, opts.holdout)
    tok = _load_tokenizer(opts, train_text)
    if t_cfg is not None and tok.vocab_size != t_cfg.vocab_size:
        raise UsageError(f"the tokenizer has {tok.vocab_size} tokens but the teacher's vocabulary has "
                         f"{t_cfg.vocab_size}; students share the teacher's tokenizer")
    s_cfg = spec.resolve(t_cfg, tok.vocab_size if t_cfg is None else t_cfg.vocab_size, tok.bos_id, tok.eos_id)
    if t_cfg is not None:
        s_cfg.bos_token_id, s_cfg.eos_token_id = t_cfg.bos_token_id, t_cfg.eos_token_id
    train_ids = torch.tensor(tok.encode(train_text, add_bos=False), dtype=torch.long)
    held_ids = torch.tensor(tok.encode(held_text, add_bos=False), dtype=torch.long)
    if train_ids.numel() < train_opts.seq_len + 2:
        raise DataError(f"{opts.data} gives {train_ids.numel()} training tokens; at least --seq-len + 2 = "
                        f"{train_opts.seq_len + 2} are needed (pass more text or a smaller --seq-len)")
    if held_ids.numel() < 2:
        raise DataError(f"{opts.data} leaves {held_ids.numel()} held-out tokens; pass more text or a larger --holdout")
    state_dir = Path(str(opts.out) + ".train-state")
    if opts.resume:
        check_resumable(state_dir, run_fingerprint(train_opts, dist.world, s_cfg.num_parameters(), train_ids.numel()))
    log(f"data: {src.description}: {train_ids.numel():,} training and {held_ids.numel():,} held-out tokens")
    # --- models
    torch.manual_seed(train_opts.seed)
    teacher = None
    if opts.teacher is not None:
        teacher, _ = load_model(opts.teacher, device=dist.device)
        teacher.requires_grad_(False)
    plan = None
    if init == "random" or teacher is None:
        student = LlamaForCausalLM(s_cfg)
        student.init_weights(seed=train_opts.seed)
    elif init == "layers":
        student = init_from_layers(teacher, s_cfg, keep)
    else:
        calib = [batch_for_calibration(train_ids, i, train_opts).to(dist.device) for i in range(opts.calib_batches)]
        student, plan = init_from_pruning(teacher, s_cfg, keep, calib)
    student.to(dist.device)
    log(f"student: {student.num_parameters():,} parameters ({s_cfg.num_hidden_layers} layers, hidden "
        f"{s_cfg.hidden_size}, {s_cfg.num_attention_heads} heads / {s_cfg.num_key_value_heads} kv, ffn "
        f"{s_cfg.intermediate_size}), init {init}")
    student.eval()
    init_metrics = heldout_metrics(student, None, held_ids, train_opts.seq_len, opts.eval_tokens, dist.device)
    history = [{"step": 0, "student_perplexity": init_metrics["student_perplexity"]}]

    def on_eval(step: int) -> None:
        m = heldout_metrics(student, None, held_ids, train_opts.seq_len, opts.eval_tokens, dist.device)
        history.append({"step": step, "student_perplexity": m["student_perplexity"]})
        log(f"step {step}: held-out perplexity {m['student_perplexity']:.3f}")

    trainer = Trainer(student, DistillLoss(teacher, opts.alpha, opts.temperature, opts.kl == "reverse"), train_ids,
                      train_opts, dist=dist, state_dir=state_dir if train_opts.save_every else None,
                      on_step=on_step, on_eval=on_eval)
    if opts.resume:
        trainer.state_dir = state_dir
        if trainer.load_state():
            log(f"resumed from step {trainer.step} ({state_dir})")
        else:
            log(f"nothing to resume in {state_dir}; starting at step 0")
    stats = trainer.run()
    final = heldout_metrics(student, teacher, held_ids, train_opts.seq_len, opts.eval_tokens, dist.device)
    history.append({"step": train_opts.steps, "student_perplexity": final["student_perplexity"]})
    # --- write (rank 0)
    params = {**opts.as_params(), "init": init, "layer_ids": keep if init != "random" else None,
              "train": train_opts.as_params(), "processes": dist.world,
              "student_config": {k: v for k, v in s_cfg.to_dict().items() if k != "architectures"}}
    metrics: dict = {"student_params": student.num_parameters(), "tokens_seen": stats["tokens_seen"],
                     "tokens_per_s": stats["tokens_per_s"], "train_seconds": stats["train_seconds"],
                     "first_loss": stats["first_loss"], "final_loss": stats["final_loss"],
                     "init_student_perplexity": init_metrics["student_perplexity"], **final,
                     "eval_history": history}
    if teacher is not None:
        metrics["teacher_params"] = teacher.num_parameters()
        metrics["compression_ratio"] = metrics["teacher_params"] / metrics["student_params"]
    if dist.main:
        import json

        with tempfile.TemporaryDirectory() as tmp:
            tok_dir = opts.teacher if opts.teacher is not None and opts.tokenizer is None else Path(tmp)
            if tok_dir == Path(tmp):
                tok.save(Path(tmp))
            extra = {"distill_config.json": json.dumps(params, indent=2, default=str) + "\n"}
            if plan is not None:
                extra["prune_plan.json"] = json.dumps(plan) + "\n"
            save_model(student, opts.out, tokenizer_from=tok_dir, dtype="float32", extra_files=extra)
        s_bytes = _weight_bytes(opts.out)
        metrics["student_bytes"] = s_bytes
        if opts.teacher is not None:
            metrics["teacher_bytes"] = _weight_bytes(opts.teacher)
            metrics["compression_ratio_bytes"] = metrics["teacher_bytes"] / s_bytes
        import shutil

        shutil.rmtree(state_dir, ignore_errors=True)
    barrier(dist)
    return {"metrics": metrics, "params": params}


def batch_for_calibration(ids: torch.Tensor, i: int, opts) -> torch.Tensor:
    """Calibration batches for pruning: drawn like training batches, from a separate seed stream."""
    from itera.train import batch_for_step

    return batch_for_step(ids, i, min(opts.batch_size, 8), opts.seq_len, opts.seed + 7919)[:, :-1]


def _weight_bytes(ckpt: Path) -> int:
    from itera.model.checkpoint import weight_files

    return sum(f.stat().st_size for f in weight_files(Path(ckpt)))
