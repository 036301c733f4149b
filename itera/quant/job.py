"""``itera quantize``: validate, calibrate, quantize layer by layer, measure, write.

Methods: ``rtn`` (round-to-nearest), ``gptq`` (:mod:`itera.quant.gptq`) and ``auto`` (per-layer
bit widths chosen from measured sensitivity under a size budget, :func:`choose_plan`).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from itera.errors import DataError, InputError, UsageError
from itera.quant.formats import (EMBEDDINGS, FORMAT_VERSION, LINEAR_SUFFIXES, QUANT_METHOD, SUPPORTED_BITS,
                                 LayerQuant, dequantize, rtn, to_tensors)

METHODS = ("rtn", "gptq", "auto")


@dataclass
class QuantizeOptions:
    """What ``itera quantize`` was asked to do; written next to the checkpoint as quantize_config.json."""

    model: Path
    out: Path
    method: str = "gptq"
    bits: int = 4
    group_size: int | None = None  # None: one scale per output channel
    sym: bool = True
    calib: str | None = None
    calib_samples: int = 32
    calib_seqlen: int = 256
    damp: float = 0.01
    act_order: bool = False
    target_bpw: float | None = None  # auto: budget in bits per weight over the quantized layers
    auto_bits: tuple[int, ...] = (2, 3, 4, 8)  # auto: candidate widths
    auto_base: str = "gptq"  # auto: how the chosen plan is applied (rtn or gptq)
    plan: Path | None = None  # a plan (module -> bits) written by an earlier `auto` run
    quantize_embeddings: bool = False
    eval_tokens: int = 4096
    holdout: float = 0.1
    seed: int = 0

    def validate(self) -> "QuantizeOptions":
        if self.method not in METHODS:
            raise UsageError(f"unknown --method {self.method!r}; use rtn, gptq or auto")
        if self.bits not in SUPPORTED_BITS:
            raise UsageError(f"--bits {self.bits} is not supported; use 8, 4, 3 or 2")
        if self.group_size is not None and self.group_size < 1:
            raise UsageError(f"--group-size must be positive (got {self.group_size})")
        if self.method in ("gptq", "auto") and not self.calib:
            raise UsageError(f"--method {self.method} needs calibration text: pass --calib FILE_OR_DATASET")
        if self.method == "auto" and self.target_bpw is None and self.plan is None:
            raise UsageError("--method auto needs --target-bpw (e.g. 4.5) or --plan FILE")
        if self.method != "auto" and (self.target_bpw is not None or self.plan is not None):
            raise UsageError("--target-bpw and --plan go with --method auto")
        if any(b not in SUPPORTED_BITS for b in self.auto_bits):
            raise UsageError(f"--auto-bits must be among {SUPPORTED_BITS}")
        if self.auto_base not in ("rtn", "gptq"):
            raise UsageError("--auto-base must be rtn or gptq")
        if self.calib_samples < 1 or self.calib_seqlen < 2 or self.eval_tokens < 2:
            raise UsageError("--calib-samples must be >= 1, --calib-seqlen and --eval-tokens >= 2")
        if not 0 < self.damp < 1:
            raise UsageError(f"--damp must be between 0 and 1 (got {self.damp})")
        return self

    def layer_quant(self, bits: int | None = None) -> LayerQuant:
        return LayerQuant(bits or self.bits, self.group_size, self.sym)

    def as_params(self) -> dict:
        d = asdict(self)
        for k in ("model", "out", "plan"):
            d[k] = str(d[k]) if d[k] is not None else None
        d["auto_bits"] = list(self.auto_bits)
        return d


def target_modules(model, quantize_embeddings: bool) -> dict[str, torch.nn.Module]:
    """name -> module of every layer to quantize (linears; embeddings and head on request)."""
    mods = {}
    for name, m in model.named_modules():
        if name.endswith(LINEAR_SUFFIXES):
            mods[name] = m
    if quantize_embeddings:
        mods["model.embed_tokens"] = model.model.embed_tokens
        if not model.config.tie_word_embeddings:
            mods["lm_head"] = model.lm_head
    return mods


def check_shapes(mods: dict, opts: QuantizeOptions, bits_used: set[int]) -> None:
    """Every layer's input width fits the group size and the bit packing; say what to pass if not."""
    widths = {name: m.weight.shape[1] for name, m in mods.items()}
    for name, n in widths.items():
        if opts.group_size is not None and n % opts.group_size:
            fits = [g for g in (32, 64, 128) if all(w % g == 0 for w in widths.values())]
            hint = f"pass --group-size {fits[-1]}" if fits else "omit --group-size for per-channel scales"
            raise UsageError(f"--group-size {opts.group_size} does not divide the {n} input columns of {name}; {hint}")
        for b in bits_used:
            if (n * b) % 8:
                raise UsageError(f"{b}-bit codes of {name} ({n} columns) do not fill whole bytes; use other --bits")


# --------------------------------------------------------------------------- calibration


def calibration_ids(tokens: torch.Tensor, samples: int, seqlen: int, seed: int) -> torch.Tensor:
    if tokens.numel() < seqlen:
        raise DataError(f"the calibration text gives {tokens.numel()} tokens, shorter than one sequence of "
                        f"--calib-seqlen {seqlen}; pass more text or a smaller --calib-seqlen")
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, tokens.numel() - seqlen + 1, (samples,), generator=gen)
    return torch.stack([tokens[s:s + seqlen] for s in starts.tolist()])


@torch.no_grad()
def layer_inputs_hessians(layer, x: torch.Tensor, cos, sin, names: dict[str, torch.nn.Module], chunk: int = 8):
    """Run one decoder layer over the calibration hidden states; return H = X^T X / n per linear."""
    hs = {n: torch.zeros(m.weight.shape[1], m.weight.shape[1]) for n, m in names.items()}
    counts = {n: 0 for n in names}
    hooks = []

    def hook_for(n):
        def hook(_m, inp):
            a = inp[0].float().flatten(0, -2)  # (tokens, in)
            hs[n].add_(a.T @ a)
            counts[n] += a.shape[0]
        return hook

    for n, m in names.items():
        hooks.append(m.register_forward_pre_hook(hook_for(n)))
    try:
        for i in range(0, x.shape[0], chunk):
            layer(x[i:i + chunk], cos, sin, None, None)
    finally:
        for h in hooks:
            h.remove()
    return {n: hs[n] / max(counts[n], 1) for n in names}


def _errors(w: torch.Tensor, w_hat: torch.Tensor, h: torch.Tensor | None) -> dict:
    """Relative weight error ||W - Q|| / ||W||; relative output error on calibration inputs,
    sqrt(tr(dW H dW^T) / tr(W H W^T)) = ||X dW^T|| / ||X W^T|| (None without a Hessian)."""
    dw = (w - w_hat).float()
    out = {"weight_error": (dw.norm() / w.float().norm()).item()}
    if h is not None:
        num = torch.einsum("oi,ij,oj->", dw, h, dw)
        den = torch.einsum("oi,ij,oj->", w.float(), h, w.float())
        out["output_error"] = math.sqrt(max(num.item(), 0.0) / den.item()) if den > 0 else None
    return out


@torch.no_grad()
def quantize_model(model, mods: dict, plan: dict[str, LayerQuant], method: str, calib: torch.Tensor | None,
                   damp: float, act_order: bool, progress=None) -> tuple[dict, dict]:
    """Quantize ``model`` in place (weights replaced by their dequantized values), layer by layer.

    Returns (tensors to write for the quantized layers, per-layer figures). With calibration
    data each decoder layer sees the outputs of the already-quantized layers before it.
    """
    tensors, figures = {}, {}

    def apply(name: str, module, h: torch.Tensor | None):
        q = plan[name]
        w = module.weight.data
        if method == "gptq" and h is not None:
            codes, scales, zeros = gptq_mod.gptq(w, h, q, damp=damp, act_order=act_order)
        else:
            codes, scales, zeros = rtn(w, q)
        w_hat = dequantize(codes, scales, zeros)
        figures[name] = {"bits": q.bits, "group_size": q.group_size, "sym": q.sym, **_errors(w, w_hat, h)}
        tensors.update(to_tensors(name, codes, scales, zeros, q))
        module.weight.data = w_hat.to(w.dtype)

    from itera.quant import gptq as gptq_mod

    layers = model.model.layers
    if calib is not None:
        x = model.model.embed_tokens(calib).float()
        cos, sin = model.rotary(torch.arange(calib.shape[1]), x.dtype)
        for i, layer in enumerate(layers):
            names = {n: m for n, m in mods.items() if n.startswith(f"model.layers.{i}.")}
            hs = layer_inputs_hessians(layer, x, cos, sin, names)
            for n, m in names.items():
                apply(n, m, hs[n])
            x = torch.cat([layer(x[j:j + 8], cos, sin, None, None) for j in range(0, x.shape[0], 8)])
            if progress:
                progress(i + 1, len(layers))
    else:
        for i in range(len(layers)):
            for n, m in mods.items():
                if n.startswith(f"model.layers.{i}."):
                    apply(n, m, None)
            if progress:
                progress(i + 1, len(layers))
    for n in EMBEDDINGS:  # embeddings and head: round-to-nearest (their "inputs" are token ids)
        if n in mods:
            apply(n, mods[n], None)
    return tensors, figures


# --------------------------------------------------------------------------- auto: measured mixed precision


@torch.no_grad()
def sensitivities(model, mods: dict, calib: torch.Tensor, candidates: tuple[int, ...], group_size: int | None,
                  sym: bool, progress=None) -> dict[str, dict[int, float]]:
    """KL(float || model with only this layer quantized at b bits, RTN), mean per calibration token."""
    ref = F.log_softmax(model(calib).float(), -1)
    out: dict[str, dict[int, float]] = {}
    for k, (name, m) in enumerate(mods.items()):
        w = m.weight.data.clone()
        out[name] = {}
        for b in candidates:
            codes, scales, zeros = rtn(w, LayerQuant(b, group_size, sym))
            m.weight.data = dequantize(codes, scales, zeros).to(w.dtype)
            logp = F.log_softmax(model(calib).float(), -1)
            out[name][b] = (ref.exp() * (ref - logp)).sum(-1).mean().item()
        m.weight.data = w
        if progress:
            progress(k + 1, len(mods))
    return out


def choose_plan(costs: dict[str, dict[int, int]], losses: dict[str, dict[int, float]], budget_bytes: int,
                units: int = 4000) -> dict[str, int]:
    """Bits per layer minimising the summed measured loss with total bytes <= budget.

    A multiple-choice knapsack solved by dynamic programming over the budget cut into ``units``
    steps; each option's bytes are rounded *up* to whole steps, so the plan never exceeds the budget.
    """
    names = list(costs)
    step = max(1, math.ceil(budget_bytes / units))
    cap = budget_bytes // step
    INF = float("inf")
    best = [0.0] + [INF] * cap  # best[c]: least loss of the layers so far using exactly c steps
    choice: list[list[int | None]] = []
    for name in names:
        new = [INF] * (cap + 1)
        pick: list[int | None] = [None] * (cap + 1)
        for b, nbytes in costs[name].items():
            c = math.ceil(nbytes / step)
            loss = losses[name][b]
            for used in range(cap - c + 1):
                if best[used] + loss < new[used + c]:
                    new[used + c] = best[used] + loss
                    pick[used + c] = b
        best = new
        choice.append(pick)
    end = min(range(cap + 1), key=lambda c: best[c])
    if best[end] == INF:
        raise UsageError("no plan fits the --target-bpw budget")
    plan: dict[str, int] = {}
    for name, pick in zip(reversed(names), reversed(choice)):
        b = pick[end]
        plan[name] = b
        end -= math.ceil(costs[name][b] / step)
    return dict(reversed(list(plan.items())))


# --------------------------------------------------------------------------- the job


def run_quantize(opts: QuantizeOptions, log=lambda msg: None, progress=None) -> dict:
    """Validate, quantize, measure and write; returns the record's metrics and params."""
    from itera.data import load_text
    from itera.evaluate import EvalOptions, evaluate_text
    from itera.model.checkpoint import (check_against_config, load_config, load_model, read_headers,
                                        weight_files)
    from itera.record import atomic_dir
    from itera.runtime.torch_backend import TorchRuntime
    from itera.tokenizer import Tokenizer

    opts.validate()
    cfg = load_config(opts.model)
    if cfg.quantization:
        q = cfg.quantization
        raise InputError(f"{opts.model} is already quantized ({q.get('method')}, {q.get('bits')} bits); "
                         "pass the float checkpoint it came from")
    check_against_config(cfg, read_headers(opts.model), opts.model)
    tok = Tokenizer.from_dir(opts.model)
    model, _ = load_model(opts.model)
    mods = target_modules(model, opts.quantize_embeddings)
    fixed_plan = None
    if opts.plan is not None:
        try:
            fixed_plan = {k: int(v) for k, v in json.loads(Path(opts.plan).read_text())["bits"].items()}
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            raise InputError(f"--plan {opts.plan} is not a plan file written by `itera quantize --method auto` "
                             "(quant_plan.json)") from None
        unknown = sorted(set(fixed_plan) ^ set(mods))
        if unknown:
            raise InputError(f"--plan {opts.plan} does not match this model's layers (e.g. {unknown[0]})")
    bits_used = set(opts.auto_bits) if opts.method == "auto" and fixed_plan is None else (
        set(fixed_plan.values()) if fixed_plan else {opts.bits})
    check_shapes(mods, opts, bits_used)
    n_weights = sum(m.weight.numel() for m in mods.values())
    sizes = {n: tuple(m.weight.shape) for n, m in mods.items()}
    if opts.method == "auto" and fixed_plan is None:
        smallest = sum(opts.layer_quant(min(opts.auto_bits)).stored_bytes(*s) for s in sizes.values()) * 8 / n_weights
        if opts.target_bpw < smallest:
            raise UsageError(f"--target-bpw {opts.target_bpw} is below the smallest plan ({smallest:.3f} bits per "
                             f"weight with {min(opts.auto_bits)}-bit layers); pass at least {smallest:.3f}")
    # --- calibration and held-out text
    calib_ids = held = None
    if opts.calib:
        src = load_text(opts.calib, purpose="train")
        cut = int(len(src.text) * (1 - opts.holdout))
        train_tokens = torch.tensor(tok.encode(src.text[:cut], add_bos=False), dtype=torch.long)
        calib_ids = calibration_ids(train_tokens, opts.calib_samples, min(opts.calib_seqlen, cfg.max_position_embeddings),
                                    opts.seed)
        held = src.text[cut:]
    eval_opts = EvalOptions(max_tokens=opts.eval_tokens, bos=False)
    before = evaluate_text(TorchRuntime(model, tok, "cpu"), held, eval_opts, source="held-out") if held else None
    # --- plan
    t0 = time.perf_counter()
    sens = None
    if opts.method == "auto":
        if fixed_plan is None:
            log(f"measuring sensitivity of {len(mods)} layers at {list(opts.auto_bits)} bits")
            sens = sensitivities(model, mods, calib_ids[: min(8, len(calib_ids))], opts.auto_bits, opts.group_size,
                                 opts.sym, progress)
            costs = {n: {b: opts.layer_quant(b).stored_bytes(*sizes[n]) for b in opts.auto_bits} for n in mods}
            fixed_plan = choose_plan(costs, sens, int(opts.target_bpw * n_weights / 8))
        plan = {n: opts.layer_quant(fixed_plan[n]) for n in mods}
        apply_method = opts.auto_base
    else:
        plan = {n: opts.layer_quant() for n in mods}
        apply_method = opts.method
    log(f"quantizing {len(mods)} layers with {apply_method}")
    tensors, figures = quantize_model(model, mods, plan, apply_method, calib_ids, opts.damp, opts.act_order, progress)
    quant_seconds = time.perf_counter() - t0
    # Everything not quantized is stored in float16: round it the same way in memory, so the
    # model measured here is bit for bit the model that loads back.
    keep = {}
    for name, t in model.state_dict().items():
        module = name.rsplit(".", 1)[0]
        if module in plan and name.endswith(".weight"):
            continue
        if cfg.tie_word_embeddings and name == "lm_head.weight":
            continue
        keep[name] = t.half()
        with torch.no_grad():
            model.get_parameter(name).copy_(t.half().float())
    after = evaluate_text(TorchRuntime(model, tok, "cpu"), held, eval_opts, source="held-out") if held else None
    # --- write
    qcfg = {"quant_method": QUANT_METHOD, "format_version": FORMAT_VERSION, "method": opts.method,
            "bits": opts.bits if opts.method != "auto" else None, "group_size": opts.group_size, "sym": opts.sym,
            "quantize_embeddings": opts.quantize_embeddings,
            "layers": {n: q.as_dict() for n, q in plan.items()}}
    config = cfg.to_dict()
    config["quantization_config"] = qcfg
    config["torch_dtype"] = "float16"
    from safetensors.torch import save_file

    from itera.model.checkpoint import TOKENIZER_FILES

    with atomic_dir(opts.out) as tmp:
        save_file({**keep, **tensors}, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        for fname in TOKENIZER_FILES:
            if (Path(opts.model) / fname).is_file():
                (tmp / fname).write_bytes((Path(opts.model) / fname).read_bytes())
        (tmp / "quant_plan.json").write_text(json.dumps({"bits": {n: q.bits for n, q in plan.items()},
                                                         "group_size": opts.group_size, "sym": opts.sym}, indent=2) + "\n")
        (tmp / "quantize_config.json").write_text(json.dumps(opts.as_params(), indent=2) + "\n")
    # --- figures, from the bytes written
    q_bytes = sum(t.numel() * t.element_size() for t in tensors.values())
    out_bytes = sum(f.stat().st_size for f in weight_files(Path(opts.out)))
    src_bytes = sum(f.stat().st_size for f in weight_files(Path(opts.model)))
    metrics = {
        "bits_per_weight": q_bytes * 8 / n_weights,
        "quantized_weights": n_weights,
        "file_bits_per_param": out_bytes * 8 / model.num_parameters(),
        "source_bytes": src_bytes, "quantized_bytes": out_bytes, "size_ratio": src_bytes / out_bytes,
        "quantize_seconds": quant_seconds,
        "perplexity_before": before["perplexity"] if before else None,
        "perplexity_after": after["perplexity"] if after else None,
        "eval_tokens": after["tokens"] if after else None,
        "mean_weight_error": sum(f["weight_error"] for f in figures.values()) / len(figures),
        "layers": figures,
    }
    if before is None:
        metrics["perplexity_note"] = "no --calib text: perplexity not measured"
    if sens is not None:
        metrics["plan_bits"] = {n: q.bits for n, q in plan.items()}
        metrics["sensitivity_kl"] = sens
    return {"metrics": metrics, "params": {**opts.as_params(), "applied_method": apply_method}, "model": model}
