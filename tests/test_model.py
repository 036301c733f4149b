"""The decoder against transformers' implementation, both directions, on tiny random configs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from itera.model.checkpoint import load_model, save_model  # noqa: E402
from itera.model.config import ModelConfig  # noqa: E402
from itera.model.llama import KVCache, LlamaForCausalLM  # noqa: E402

LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 16}
BASE = dict(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=256)
CASES = {
    "mha-untied": ("LlamaConfig", {}),
    "gqa-llama3-rope": ("LlamaConfig", dict(num_key_value_heads=2, rope_theta=500.0, rope_scaling=LLAMA3_ROPE)),
    "tied-bias-linear-rope": ("LlamaConfig", dict(num_key_value_heads=1, tie_word_embeddings=True, attention_bias=True,
                                                  mlp_bias=True, rope_scaling={"rope_type": "linear", "factor": 4.0})),
    "qwen2-qkv-bias-head-dim": ("Qwen2Config", dict(num_key_value_heads=2, head_dim=16)),
    "mistral-sliding-window": ("MistralConfig", dict(num_key_value_heads=2, sliding_window=8)),
}
TOL = 1e-4


def hf_model(kind: str, overrides: dict, seed: int = 0):
    cfg_cls = getattr(transformers, kind)
    model_cls = getattr(transformers, kind.replace("Config", "ForCausalLM"))
    torch.manual_seed(seed)
    cfg = cfg_cls(**{**BASE, **overrides})
    if kind == "MistralConfig":
        cfg._attn_implementation = "eager"
    m = model_cls(cfg).eval()
    with torch.no_grad():  # larger than the default init so that differences would show
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return m


def ids(seed: int = 1, T: int = 40, B: int = 2) -> torch.Tensor:
    return torch.randint(0, BASE["vocab_size"], (B, T), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("case", list(CASES))
def test_transformers_checkpoint_loads_with_same_logits(case, tmp_path):
    kind, overrides = CASES[case]
    ref = hf_model(kind, overrides)
    ref.save_pretrained(tmp_path / "hf")
    ours, cfg = load_model(tmp_path / "hf")
    x = ids()
    with torch.no_grad():
        diff = (ref(x).logits - ours(x)).abs().max().item()
    assert diff < TOL, f"{case}: max |logit diff| {diff}"


@pytest.mark.parametrize("case", list(CASES))
def test_itera_checkpoint_loads_in_transformers_with_same_logits(case, tmp_path):
    kind, overrides = CASES[case]
    ref = hf_model(kind, overrides, seed=3)
    ref.save_pretrained(tmp_path / "hf")
    ours, _ = load_model(tmp_path / "hf")
    save_model(ours, tmp_path / "itera")
    written = json.loads((tmp_path / "itera" / "config.json").read_text())
    assert written["architectures"] == [kind.replace("Config", "ForCausalLM")]
    back = getattr(transformers, kind.replace("Config", "ForCausalLM")).from_pretrained(
        tmp_path / "itera", dtype=torch.float32).eval()
    x = ids(seed=2)
    with torch.no_grad():
        diff = (back(x).logits - ours(x)).abs().max().item()
    assert diff < TOL, f"{case}: max |logit diff| {diff}"


def test_rope_scaling_changes_logits_past_original_context():
    """Guards the parity tests above: scaling must matter, or they would pass with it ignored."""
    plain = ModelConfig(**BASE, rope_theta=500.0)
    scaled = ModelConfig(**BASE, rope_theta=500.0, rope_scaling=LLAMA3_ROPE)
    a, b = LlamaForCausalLM(plain), LlamaForCausalLM(scaled)
    a.init_weights(seed=0, std=0.1)
    b.load_state_dict(a.state_dict())
    with torch.no_grad():
        assert (a(ids(T=64)) - b(ids(T=64))).abs().max() > 1e-3


def test_sharded_checkpoint_round_trip(tmp_path):
    ref = hf_model("LlamaConfig", {"num_key_value_heads": 2})
    ours, _ = load_model(_save(ref, tmp_path / "hf"))
    save_model(ours, tmp_path / "sharded", max_shard_bytes=20_000)
    shards = sorted(p.name for p in (tmp_path / "sharded").glob("model-*.safetensors"))
    assert len(shards) > 2 and (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    again, _ = load_model(tmp_path / "sharded")
    back = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "sharded", dtype=torch.float32).eval()
    x = ids()
    with torch.no_grad():
        assert torch.equal(again(x), ours(x))
        assert (back(x).logits - ours(x)).abs().max() < TOL


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_weights_load(dtype, tmp_path):
    ref = hf_model("LlamaConfig", {"num_key_value_heads": 2}).to(dtype)
    ref.save_pretrained(tmp_path / "half")
    ours32, _ = load_model(tmp_path / "half")  # fp32 compute from half weights: exact upcast
    assert ours32.model.embed_tokens.weight.dtype == torch.float32
    assert torch.equal(ours32.model.embed_tokens.weight, ref.model.embed_tokens.weight.float())
    ours16, _ = load_model(tmp_path / "half", dtype=dtype)
    assert ours16.lm_head.weight.dtype == dtype
    x = ids()
    with torch.no_grad():
        ref32 = ref.float()(x).logits
        # half compute is close to fp32 compute on the same weights, not equal
        assert (ours16(x).float() - ref32).abs().max() < 0.1
        assert (ours32(x) - ref32).abs().max() < TOL


@pytest.mark.skipif(not Path("/proc/self/maps").is_file(), reason="reads Linux's /proc/self/maps")
def test_loaded_weights_keep_no_mapping_of_the_file(tmp_path):
    """Weights are read into memory of their own: a memory-mapped file would stay resident as long
    as any tensor viewing it lives (a kept embedding held the whole file beside a quantized copy)."""
    ref = hf_model("LlamaConfig", {"num_key_value_heads": 2})
    path = _save(ref, tmp_path / "hf")
    ours, _ = load_model(path)
    files = [str(f.resolve()) for f in path.glob("*.safetensors")]
    assert files and not [f for f in files if f in Path("/proc/self/maps").read_text()]
    assert torch.equal(ours.model.embed_tokens.weight, ref.model.embed_tokens.weight)


def test_kv_cache_decoding_matches_full_forward():
    cfg = ModelConfig(**BASE, num_key_value_heads=2)
    m = LlamaForCausalLM(cfg)
    m.init_weights(seed=0, std=0.1)
    x = ids(B=1, T=24)
    with torch.no_grad():
        full = m(x)
        cache = KVCache()
        parts = [m(x[:, :10], cache=cache)]
        for t in range(10, 24):
            parts.append(m(x[:, t:t + 1], cache=cache))
    assert (torch.cat(parts, dim=1) - full).abs().max() < 1e-5


def test_parameter_count_formula_matches_module():
    for kind, overrides in CASES.values():
        if kind != "LlamaConfig":
            continue
        cfg = ModelConfig(**BASE, **overrides)
        assert cfg.num_parameters() == LlamaForCausalLM(cfg).num_parameters()


def _save(model, path):
    model.save_pretrained(path)
    return path
