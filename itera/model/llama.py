"""A Llama-family decoder in plain PyTorch, with Hugging Face's parameter names.

RMSNorm (Zhang & Sennrich 2019), rotary position embeddings (Su et al. 2021) with Llama-3
frequency scaling, SwiGLU MLP (Shazeer 2020), grouped-query attention (Ainslie et al. 2023).
Module attribute names mirror transformers' LlamaForCausalLM so that ``state_dict()`` keys
are the checkpoint's tensor names (``model.layers.0.self_attn.q_proj.weight``, ...).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from itera.model.config import ModelConfig


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32 and cast back before the gain, as Llama's reference does, so that
        # bf16/fp16 compute matches other implementations bit for bit where possible.
        dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(dtype)


def rope_inv_freq(cfg: ModelConfig) -> torch.Tensor:
    """Inverse frequencies (head_dim/2,) with the config's rope scaling applied."""
    d = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))
    kind = cfg.rope_type
    if kind == "linear":
        # Position interpolation (Chen et al. 2023): positions / factor == inv_freq / factor.
        inv_freq = inv_freq / float(cfg.rope_scaling["factor"])
    elif kind == "llama3":
        # Llama 3.1: long wavelengths are slowed by `factor`, short ones kept, and the band
        # between them interpolated smoothly.
        s = cfg.rope_scaling
        factor = float(s["factor"])
        low, high = float(s.get("low_freq_factor", 1.0)), float(s.get("high_freq_factor", 4.0))
        old_ctx = float(s.get("original_max_position_embeddings", 8192))
        low_wavelen, high_wavelen = old_ctx / low, old_ctx / high
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_ctx / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        inv_freq = torch.where(medium, smoothed, scaled)
    return inv_freq


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


@dataclass
class KVCache:
    """Keys and values of earlier positions, one (k, v) pair per layer, each (B, n_kv, S, hd)."""

    layers: list = field(default_factory=list)

    @property
    def seq_len(self) -> int:
        return self.layers[0][0].shape[2] if self.layers else 0


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.cfg, self.layer_idx = cfg, layer_idx
        nh, nkv, hd, h = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, cfg.hidden_size
        qkv_bias = cfg.attention_bias or cfg.qkv_bias
        self.q_proj = nn.Linear(h, nh * hd, bias=qkv_bias)
        self.k_proj = nn.Linear(h, nkv * hd, bias=qkv_bias)
        self.v_proj = nn.Linear(h, nkv * hd, bias=qkv_bias)
        self.o_proj = nn.Linear(nh * hd, h, bias=cfg.attention_bias)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                mask: torch.Tensor | None, cache: KVCache | None) -> torch.Tensor:
        B, T, _ = x.shape
        cfg = self.cfg
        q = self.q_proj(x).view(B, T, cfg.num_attention_heads, cfg.head_dim).transpose(1, 2)  # (B, nh, T, hd)
        k = self.k_proj(x).view(B, T, cfg.num_key_value_heads, cfg.head_dim).transpose(1, 2)  # (B, nkv, T, hd)
        v = self.v_proj(x).view(B, T, cfg.num_key_value_heads, cfg.head_dim).transpose(1, 2)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        if cache is not None:
            if len(cache.layers) > self.layer_idx:
                pk, pv = cache.layers[self.layer_idx]
                k, v = torch.cat([pk, k], dim=2), torch.cat([pv, v], dim=2)
                cache.layers[self.layer_idx] = (k, v)
            else:
                cache.layers.append((k, v))
        if cfg.n_rep > 1:  # GQA: each kv head serves n_rep consecutive query heads
            k = k.repeat_interleave(cfg.n_rep, dim=1)
            v = v.repeat_interleave(cfg.n_rep, dim=1)
        if mask is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        y = y.transpose(1, 2).reshape(B, T, cfg.num_attention_heads * cfg.head_dim)
        return self.o_proj(y)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        h, f, b = cfg.hidden_size, cfg.intermediate_size, cfg.mlp_bias
        self.gate_proj = nn.Linear(h, f, bias=b)
        self.up_proj = nn.Linear(h, f, bias=b)
        self.down_proj = nn.Linear(f, h, bias=b)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.self_attn = Attention(cfg, layer_idx)
        self.mlp = MLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x, cos, sin, mask, cache):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class Decoder(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class LlamaForCausalLM(nn.Module):
    """The decoder plus its output head. ``forward(input_ids) -> logits (B, T, vocab)``."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.model = Decoder(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        # Not a parameter and not saved: recomputed from the config on load.
        self.register_buffer("inv_freq", rope_inv_freq(cfg), persistent=False)

    def init_weights(self, seed: int | None = None, std: float = 0.02) -> None:
        """Llama's initialisation: N(0, std) for matrices and embeddings, zero bias, unit norms."""
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        for name, p in self.named_parameters():
            with torch.no_grad():
                if name.endswith("norm.weight"):
                    p.fill_(1.0)
                elif name.endswith(".bias"):
                    p.zero_()
                else:
                    p.copy_(torch.randn(p.shape, generator=gen) * std)

    def rotary(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin of shape (T, head_dim), computed in fp32 and cast to the compute dtype."""
        freqs = positions.float()[:, None] * self.inv_freq.float()[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(dtype), emb.sin().to(dtype)

    def _mask(self, T: int, past: int, device, attention_mask: torch.Tensor | None) -> torch.Tensor | None:
        """Boolean (B|1, 1, T, past+T) mask, True where attention is allowed; None means plain causal."""
        window = self.config.sliding_window
        needs_window = window is not None and past + T > window
        if attention_mask is None and past == 0 and not needs_window:
            return None
        q_pos = torch.arange(past, past + T, device=device)[:, None]
        k_pos = torch.arange(past + T, device=device)[None, :]
        allowed = k_pos <= q_pos
        if needs_window:
            allowed = allowed & (q_pos - k_pos < window)
        allowed = allowed[None, None]
        if attention_mask is not None:  # (B, past+T), 1 for real tokens
            allowed = allowed & attention_mask[:, None, None, :].bool()
        return allowed

    def hidden(self, input_ids: torch.Tensor, cache: KVCache | None = None,
               attention_mask: torch.Tensor | None = None, layers_out: list | None = None) -> torch.Tensor:
        """Final normed hidden states (B, T, hidden). Given a list as ``layers_out``, each decoder
        layer's output (the residual stream after that layer, before the final norm; (B, T, hidden),
        part of the autograd graph) is appended to it in layer order, from the same forward pass."""
        B, T = input_ids.shape
        past = cache.seq_len if cache is not None else 0
        x = self.model.embed_tokens(input_ids)
        cos, sin = self.rotary(torch.arange(past, past + T, device=input_ids.device), x.dtype)
        mask = self._mask(T, past, input_ids.device, attention_mask)
        for layer in self.model.layers:
            x = layer(x, cos, sin, mask, cache)
            if layers_out is not None:
                layers_out.append(x)
        return self.model.norm(x)

    def forward(self, input_ids: torch.Tensor, cache: KVCache | None = None,
                attention_mask: torch.Tensor | None = None, return_hidden: bool = False,
                layers_out: list | None = None) -> torch.Tensor:
        """Logits (B, T, vocab), or with ``return_hidden`` the final hidden states (B, T, hidden)
        so that a caller can apply ``lm_head`` in chunks (long vocabularies, distillation).
        ``layers_out``: as in :meth:`hidden` (per-layer states for intermediate-layer distillation)."""
        h = self.hidden(input_ids, cache, attention_mask, layers_out)
        return h if return_hidden else self.lm_head(h)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())  # tied weights counted once
