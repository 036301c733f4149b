"""Students cut out of a teacher: whole layers copied (``--init layers``), or a structurally
pruned teacher (``--init prune``): heads, FFN channels and hidden channels ranked by activation
importance on calibration batches (Minitron: Muralidharan et al. 2024, "Compact Language Models
via Pruning and Knowledge Distillation")."""

from __future__ import annotations

import torch

from itera.model.config import ModelConfig
from itera.model.llama import LlamaForCausalLM


def evenly_spaced(n_teacher: int, n_student: int) -> list[int]:
    """Layer indices to keep: first and last included, the rest spread evenly."""
    if n_student == 1:
        return [0]
    return sorted({round(i * (n_teacher - 1) / (n_student - 1)) for i in range(n_student)})


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
