"""Model configuration: the Llama family as described by a Hugging Face ``config.json``.

Field names are LlamaConfig's. Both spellings of rotary settings are read: transformers 4.x
(``rope_theta`` + ``rope_scaling``) and transformers 5.x (``rope_parameters``, which carries
``rope_theta`` and ``rope_type`` in one dict).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from itera.errors import CheckpointError, UnsupportedModelError, UsageError

# model_type -> the architecture name written into config.json. All three share Llama's
# tensor names; Qwen2 differs only by bias on q/k/v (not o), Mistral by an optional sliding window.
FAMILY = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
}
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")
# Upper bounds on size fields, checked before anything is allocated: far above any released model
# of the family (Llama 3.1 405B: 126 layers, hidden 16384; Qwen2: 151,936 tokens; 10M-token
# contexts), far below what would exhaust memory building shape tables.
LIMITS = {"vocab_size": 1 << 22, "hidden_size": 1 << 16, "intermediate_size": 1 << 20, "num_hidden_layers": 1024,
          "num_attention_heads": 1024, "num_key_value_heads": 1024, "head_dim": 4096,
          "max_position_embeddings": 1 << 24}


@dataclass
class ModelConfig:
    """A Llama-family decoder's shape. ``extra`` keeps config.json fields itera does not use,
    so a checkpoint that is loaded and saved again keeps them."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # Llama: bias on q, k, v and o
    qkv_bias: bool = False  # Qwen2: bias on q, k, v only
    mlp_bias: bool = False
    hidden_act: str = "silu"
    sliding_window: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    model_type: str = "llama"
    torch_dtype: str | None = None
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None and self.num_attention_heads:
            self.head_dim = self.hidden_size // self.num_attention_heads
        self.validate()

    # ------------------------------------------------------------------ checks

    def validate(self) -> None:
        for name, limit in LIMITS.items():
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise CheckpointError(f"config field {name} must be a positive integer, got {v!r}")
            if v > limit:
                raise CheckpointError(f"config field {name} is {v}, beyond any model itera supports (at most "
                                      f"{limit}); check config.json")
        if self.max_position_embeddings < 2:
            raise CheckpointError(f"config field max_position_embeddings must be at least 2 (got "
                                  f"{self.max_position_embeddings}); check config.json")
        if not (math.isfinite(self.rope_theta) and self.rope_theta > 0):
            raise CheckpointError(f"config field rope_theta must be a positive number, got {self.rope_theta!r}")
        if not (math.isfinite(self.rms_norm_eps) and 0 < self.rms_norm_eps < 1):
            raise CheckpointError(f"config field rms_norm_eps must be between 0 and 1, got {self.rms_norm_eps!r}")
        if self.sliding_window is not None and (not isinstance(self.sliding_window, int)
                                                or isinstance(self.sliding_window, bool) or self.sliding_window < 1):
            raise CheckpointError(f"config field sliding_window must be a positive integer or null, "
                                  f"got {self.sliding_window!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise CheckpointError(
                f"num_key_value_heads ({self.num_key_value_heads}) must divide "
                f"num_attention_heads ({self.num_attention_heads})"
            )
        if self.head_dim % 2:
            raise CheckpointError(f"head_dim must be even for rotary embeddings, got {self.head_dim}")
        if self.hidden_act not in ("silu", "swish"):
            raise UnsupportedModelError(
                f"hidden_act {self.hidden_act!r} is not supported; itera implements SwiGLU (silu)"
            )
        rope_type = self.rope_type
        if rope_type not in SUPPORTED_ROPE_TYPES:
            raise UnsupportedModelError(
                f"rope_scaling type {rope_type!r} is not supported; itera implements "
                + ", ".join(SUPPORTED_ROPE_TYPES)
            )
        if rope_type != "default":
            factor = self.rope_scaling.get("factor")
            if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not (math.isfinite(factor)
                                                                                       and factor > 0):
                raise CheckpointError(f"rope_scaling of type {rope_type!r} needs a positive 'factor', got {factor!r}")

    @property
    def rope_type(self) -> str:
        if not self.rope_scaling:
            return "default"
        return self.rope_scaling.get("rope_type", self.rope_scaling.get("type", "default"))

    @property
    def quantization(self) -> dict | None:
        """itera's quantization_config when the checkpoint is quantized, else None."""
        q = self.extra.get("quantization_config")
        if q is None:
            return None
        if not isinstance(q, dict) or q.get("quant_method") != "itera":
            method = q.get("quant_method") if isinstance(q, dict) else q
            raise UnsupportedModelError(f"quantization_config with quant_method {method!r} is not supported; "
                                        "itera reads its own quantized checkpoints — pass the float checkpoint")
        return q

    @property
    def n_rep(self) -> int:
        """How many query heads share one key/value head (grouped-query attention)."""
        return self.num_attention_heads // self.num_key_value_heads

    def num_parameters(self) -> int:
        h, f, v, L = self.hidden_size, self.intermediate_size, self.vocab_size, self.num_hidden_layers
        q = self.num_attention_heads * self.head_dim
        kv = self.num_key_value_heads * self.head_dim
        attn = h * q + 2 * h * kv + q * h
        if self.attention_bias:
            attn += q + 2 * kv + h
        elif self.qkv_bias:
            attn += q + 2 * kv
        mlp = 3 * h * f + ((2 * f + h) if self.mlp_bias else 0)
        per_layer = attn + mlp + 2 * h
        head = 0 if self.tie_word_embeddings else v * h
        return v * h + L * per_layer + h + head

    # ------------------------------------------------------------------ I/O

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        d = dict(d)
        model_type = d.get("model_type")
        if model_type not in FAMILY:
            raise UnsupportedModelError(
                f"model_type {model_type!r} is not a Llama-family model; itera supports "
                + ", ".join(sorted(FAMILY))
            )
        rope_scaling = d.get("rope_scaling")
        rope_theta = d.get("rope_theta")
        params = d.get("rope_parameters")
        if isinstance(params, dict):  # transformers >= 5 layout
            params = dict(params)
            rope_theta = params.pop("rope_theta", rope_theta)
            if params.get("rope_type", "default") != "default":
                rope_scaling = params
        if rope_scaling is not None and not isinstance(rope_scaling, dict):
            raise CheckpointError(f"config field rope_scaling must be an object, got {rope_scaling!r}")
        if model_type == "qwen2":
            qkv_bias, attention_bias = True, False
        else:
            qkv_bias, attention_bias = False, bool(d.get("attention_bias", False))
        sliding = d.get("sliding_window")
        if model_type == "qwen2" and not d.get("use_sliding_window", False):
            sliding = None
        known = {f for f in cls.__dataclass_fields__ if f not in ("extra", "qkv_bias")}
        known |= {"rope_parameters", "use_sliding_window", "dtype"}
        try:
            return cls(
                vocab_size=d.get("vocab_size"),
                hidden_size=d.get("hidden_size"),
                intermediate_size=d.get("intermediate_size"),
                num_hidden_layers=d.get("num_hidden_layers"),
                num_attention_heads=d.get("num_attention_heads"),
                num_key_value_heads=d.get("num_key_value_heads"),
                head_dim=d.get("head_dim"),
                max_position_embeddings=_integer(d.get("max_position_embeddings", 2048), "max_position_embeddings"),
                rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
                rope_theta=float(rope_theta if rope_theta is not None else 10000.0),
                rope_scaling=rope_scaling,
                tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
                attention_bias=attention_bias,
                qkv_bias=qkv_bias,
                mlp_bias=bool(d.get("mlp_bias", False)),
                hidden_act=d.get("hidden_act", "silu"),
                sliding_window=sliding,
                bos_token_id=d.get("bos_token_id"),
                eos_token_id=d.get("eos_token_id"),
                pad_token_id=d.get("pad_token_id"),
                model_type=model_type,
                torch_dtype=d.get("torch_dtype", d.get("dtype")),
                extra={k: v for k, v in d.items() if k not in known},
            )
        except (TypeError, ValueError) as e:
            raise CheckpointError(f"config.json has a field of the wrong type: {e}") from None

    @classmethod
    def from_file(cls, path: Path) -> "ModelConfig":
        """config.json of a checkpoint; NaN and Infinity are refused like any other bad value."""
        path = Path(path)
        try:
            d = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise CheckpointError(
                f"{path.parent} has no config.json; pass a Hugging Face-style checkpoint directory"
            ) from None
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{path} is not valid JSON ({e}); restore the file from the source checkpoint") from None
        if not isinstance(d, dict):
            raise CheckpointError(f"{path} must hold a JSON object")
        return cls.from_dict(d)

    def to_dict(self) -> dict[str, Any]:
        """config.json content with LlamaConfig field names, loadable by transformers 4.x and 5.x."""
        d = asdict(self)
        extra = d.pop("extra")
        d.pop("qkv_bias")  # implied by model_type
        if self.model_type == "qwen2":
            d.pop("attention_bias")
            d["use_sliding_window"] = self.sliding_window is not None
        if d["sliding_window"] is None and self.model_type == "llama":
            d.pop("sliding_window")
        if d["torch_dtype"] is None:
            d.pop("torch_dtype")
        out = {**extra, **d}
        out["architectures"] = [FAMILY[self.model_type]]
        return dict(sorted(out.items()))


def _integer(v: Any, name: str) -> int:
    """An integer config field that JSON may spell as a whole float (2048.0, 1e12)."""
    if isinstance(v, bool) or not isinstance(v, (int, float)) or (isinstance(v, float) and not v.is_integer()):
        raise CheckpointError(f"config field {name} must be a positive integer, got {v!r}")
    return int(v)


def config_from_options(vocab_size: int, hidden_size: int, num_layers: int, num_heads: int,
                        num_kv_heads: int | None = None, intermediate_size: int | None = None,
                        **kw: Any) -> ModelConfig:
    """A new Llama config from the few numbers a user picks; validates divisibility with clear errors."""
    if num_heads <= 0 or hidden_size % num_heads:
        raise UsageError(f"--heads ({num_heads}) must divide --hidden ({hidden_size})")
    kv = num_kv_heads or num_heads
    if kv <= 0 or num_heads % kv:
        raise UsageError(f"--kv-heads ({kv}) must divide --heads ({num_heads})")
    if intermediate_size is None:
        # Llama's rule: 2/3 of 4h, rounded up to a multiple of 32.
        intermediate_size = int(math.ceil(8 * hidden_size / 3 / 32) * 32)
    return ModelConfig(vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=intermediate_size,
                       num_hidden_layers=num_layers, num_attention_heads=num_heads,
                       num_key_value_heads=kv, **kw)
