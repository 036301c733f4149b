"""LoRA (Hu et al. 2021): a frozen linear layer plus a trainable low-rank update,
``y = W x + (alpha / r) * B A dropout(x)``, with PEFT's parameter names and adapter files.

The reference policy of DPO is the same model with adapters switched off
(:func:`adapters_disabled`), so no second copy of the weights sits in memory.
"""

from __future__ import annotations

import contextlib
import json
import math
from pathlib import Path

import torch
from torch import nn

from itera.errors import UsageError

TARGETS = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj", "o": "self_attn.o_proj",
           "gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj"}


class LoRALinear(nn.Module):
    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout: float, gen: torch.Generator | None = None):
        super().__init__()
        self.base = base
        self.r, self.alpha = r, alpha
        self.scaling = alpha / r
        self.lora_A = nn.Linear(base.in_features, r, bias=False)
        self.lora_B = nn.Linear(r, base.out_features, bias=False)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.enabled = True
        with torch.no_grad():  # PEFT's default: A ~ kaiming-uniform(a=sqrt(5)), B = 0, so training starts at the base
            bound = 1 / math.sqrt(base.in_features)  # kaiming_uniform with a=sqrt(5) gives this bound
            self.lora_A.weight.copy_(torch.rand(self.lora_A.weight.shape, generator=gen) * 2 * bound - bound)
            self.lora_B.weight.zero_()
        self.to(device=base.weight.device)  # beside the base layer (cuda when the model is there)

    @property
    def weight(self) -> torch.Tensor:  # so code that reads `.weight` of a projection still works
        return self.base.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        if self.enabled:
            y = y + self.lora_B(self.lora_A(self.dropout(x))) * self.scaling
        return y

    def delta(self) -> torch.Tensor:
        return (self.lora_B.weight @ self.lora_A.weight) * self.scaling


PEFT_NAMES = {v.split(".")[1]: k for k, v in TARGETS.items()}  # q_proj -> q: the names adapter_config.json writes


def parse_targets(spec: str) -> list[str]:
    """Short names (q,k,v,o,gate,up,down) or PEFT's module names (q_proj, ..., down_proj), comma-separated."""
    names = [PEFT_NAMES.get(t.strip(), t.strip()) for t in spec.split(",") if t.strip()]
    bad = [t for t in names if t not in TARGETS]
    if bad or not names:
        raise UsageError(f"unknown --lora-targets {bad or spec!r}; use a comma list of {', '.join(TARGETS)} "
                         f"(or {', '.join(PEFT_NAMES)})")
    return list(dict.fromkeys(names))


def add_lora(model: nn.Module, targets: list[str], r: int, alpha: float, dropout: float, seed: int = 0) -> list[str]:
    """Wrap the target projections of every layer; freeze everything else. Returns wrapped module names."""
    if r < 1:
        raise UsageError(f"--lora-rank must be at least 1 (got {r})")
    model.requires_grad_(False)
    gen = torch.Generator().manual_seed(seed)
    wrapped = []
    for i, layer in enumerate(model.model.layers):
        for t in targets:
            parent_name, attr = TARGETS[t].split(".")
            parent = getattr(layer, parent_name)
            lora = LoRALinear(getattr(parent, attr), r, alpha, dropout, gen)
            setattr(parent, attr, lora)
            wrapped.append(f"model.layers.{i}.{TARGETS[t]}")
    return wrapped


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


@contextlib.contextmanager
def adapters_disabled(model: nn.Module):
    mods = lora_modules(model).values()
    for m in mods:
        m.enabled = False
    try:
        yield
    finally:
        for m in mods:
            m.enabled = True


def peft_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Adapter weights under PEFT's names: base_model.model.<module>.lora_A.weight / lora_B.weight."""
    out = {}
    for name, m in lora_modules(model).items():
        out[f"base_model.model.{name}.lora_A.weight"] = m.lora_A.weight.detach().cpu().contiguous()
        out[f"base_model.model.{name}.lora_B.weight"] = m.lora_B.weight.detach().cpu().contiguous()
    return out


def save_adapter(model: nn.Module, out: Path, targets: list[str], r: int, alpha: float, dropout: float,
                 base_model: str) -> None:
    """Write adapter_config.json and adapter_model.safetensors as PEFT does (into an existing dir)."""
    from safetensors.torch import save_file

    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model,
        "r": r, "lora_alpha": alpha, "lora_dropout": dropout, "bias": "none", "fan_in_fan_out": False,
        "target_modules": sorted(TARGETS[t].split(".")[1] for t in targets), "inference_mode": True,
        "init_lora_weights": True, "modules_to_save": None, "use_rslora": False, "use_dora": False,
    }
    (out / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
    save_file(peft_state_dict(model), str(out / "adapter_model.safetensors"), metadata={"format": "pt"})


def merge_lora(model: nn.Module) -> None:
    """Fold every adapter into its base weight (W += scale * B A) and unwrap the modules."""
    for name, m in list(lora_modules(model).items()):
        with torch.no_grad():
            m.base.weight += m.delta().to(m.base.weight.dtype)
        parent = model.get_submodule(name.rsplit(".", 1)[0])
        setattr(parent, name.rsplit(".", 1)[1], m.base)
