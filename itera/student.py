"""Student shapes for ``itera distill``: explicit sizes, or depth/width fractions of the teacher,
from a preset in ``itera.configs/students`` or a YAML file with the same field names; and the
checks that a student can be cut out of a given teacher."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

from itera.errors import UsageError
from itera.model.config import ModelConfig

INITS = ("random", "layers", "prune")


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
        from itera.paths import load_preset

        names = [f.name for f in fields(cls)]
        path, data = load_preset(preset, "students", "student preset", "fields " + ", ".join(sorted(names)))
        unknown = sorted((k for k in data if k not in names), key=str)
        if unknown:
            raise UsageError(f"student preset {path} has unknown field {unknown[0]!r}; fields: {', '.join(sorted(names))}")
        for key, v in data.items():
            if v is None:
                continue
            kind = _FIELD_KINDS[key]
            if kind == "int":
                ok = isinstance(v, int) and not isinstance(v, bool) and v >= 1
                want = "an integer >= 1"
            elif kind == "fraction":
                ok = isinstance(v, (int, float)) and not isinstance(v, bool) and 0 < v <= 1
                want = "a number in (0, 1]"
            elif kind == "bool":
                ok, want = isinstance(v, bool), "true or false"
            else:
                ok, want = v in INITS, "one of " + ", ".join(INITS)
            if not ok:
                raise UsageError(f"student preset {path}: field {key} must be {want}, got {v!r}")
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


# what each StudentSpec field of a preset file holds (checked before anything uses it)
_FIELD_KINDS = {"layers": "int", "hidden": "int", "heads": "int", "kv_heads": "int", "ffn": "int",
                "max_position_embeddings": "int", "depth": "fraction", "width": "fraction", "init": "init",
                "tie_word_embeddings": "bool"}


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
