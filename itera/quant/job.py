"""``itera quantize``: the recipe, in phases: :func:`load_source`, :func:`calibrate`,
:func:`choose_layers` (the plan), :func:`quantize_model` (apply), :func:`write`, and the
figures measured before and after.

Methods: ``rtn`` (round-to-nearest), ``gptq`` (:mod:`itera.quant.gptq`) and ``auto`` (per-layer
bit widths chosen from measured sensitivity under a size budget, :mod:`itera.quant.plan`).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from itera.errors import InputError, UsageError
from itera.progress import SILENT, Reporter
from itera.quant.formats import FORMAT_VERSION, LINEAR_SUFFIXES, QUANT_METHOD, SUPPORTED_BITS, LayerQuant
from itera.quant.layerwise import quantize_model
from itera.quant.plan import choose_plan, sensitivities
from itera.record import Outcome, describe_artifact

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
    auto_bits: tuple[int, ...] | str = (2, 3, 4, 8)  # auto: candidate widths (or "2,3,4,8")
    auto_base: str = "gptq"  # auto: how the chosen plan is applied (rtn or gptq)
    plan: Path | None = None  # a plan (module -> bits) written by an earlier `auto` run
    quantize_embeddings: bool = False
    eval_tokens: int = 4096
    holdout: float = 0.1
    seed: int = 0
    device: str = "cpu"  # where calibration and GPTQ run (cuda, cuda:N, auto)
    text_field: str = "text"
    force: bool = False

    def validate(self) -> "QuantizeOptions":
        if isinstance(self.auto_bits, str):
            try:
                self.auto_bits = tuple(int(b) for b in self.auto_bits.split(","))
            except ValueError:
                raise UsageError(f"--auto-bits must be comma-separated integers, e.g. 2,3,4,8 "
                                 f"(got {self.auto_bits!r})") from None
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

    def inputs(self) -> list[Path]:
        from itera.data import local_path

        return [p for p in (self.model, local_path(self.calib) if self.calib else None, self.plan) if p is not None]

    def outputs(self) -> list:
        from itera.fsio import Output

        return [Output(self.out, "dir", "--out", self.force)]

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


MIN_GROUP = 16  # below this a float16 scale costs a bit per weight or more: per-channel is better


def fit_layer(name: str, n_in: int, bits: int, group_size: int | None, sym: bool) -> tuple[LayerQuant, dict | None]:
    """The quantization a layer of ``n_in`` input columns gets, and the fallback taken, if any.

    A group size that does not divide the columns is halved down to 16 until one does, else the
    layer gets one scale per output row; codes that would not fill whole bytes (3 bits on an
    odd width) move to the next width that packs. Never a refusal: llama.cpp falls back per
    tensor the same way."""
    group, reasons = group_size, []
    if group is not None and n_in % group:
        g = group // 2
        while g >= MIN_GROUP and n_in % g:
            g //= 2
        group = g if g >= MIN_GROUP else None
        reasons.append(f"{group_size} does not divide its {n_in} input columns: "
                       + (f"the smaller group {group} does" if group else "one scale per output row"))
    width = bits
    while (n_in * width) % 8:
        width = next(b for b in SUPPORTED_BITS if b > width)
    if width != bits:
        reasons.append(f"{bits}-bit codes of {n_in} columns do not fill whole bytes: {width} bits do")
    q = LayerQuant(width, group, sym)
    if not reasons:
        return q, None
    return q, {"tensor": name, "wanted": _label(LayerQuant(bits, group_size, sym)), "used": _label(q),
               "reason": "; ".join(reasons)}


def _label(q: LayerQuant) -> str:
    return f"{q.bits}-bit " + (f"group {q.group_size}" if q.group_size else "per-channel") + \
        (" sym" if q.sym else " asym")


# --------------------------------------------------------------------------- phases


@dataclass
class Source:
    cfg: object
    tokenizer: object
    model: torch.nn.Module
    mods: dict[str, torch.nn.Module]  # the layers to quantize
    fixed_plan: dict[str, int] | None  # bits per layer from --plan


def load_source(opts: QuantizeOptions) -> Source:
    """The float model, the layers to quantize, and a --plan checked against them."""
    from itera.model.checkpoint import load_checked_config, load_config, load_model
    from itera.tokenizer import Tokenizer

    cfg = load_config(opts.model)
    if cfg.quantization:
        q = cfg.quantization
        raise InputError(f"{opts.model} is already quantized ({q.get('method')}, {q.get('bits')} bits); "
                         "pass the float checkpoint it came from")
    load_checked_config(opts.model)
    tok = Tokenizer.from_dir(opts.model)
    tok.check_fits(cfg.vocab_size, str(opts.model))
    model, _ = load_model(opts.model, device=opts.device)
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
    if opts.method == "auto" and fixed_plan is None:
        n_weights = sum(m.weight.numel() for m in mods.values())
        smallest = sum(fit_layer(n, m.weight.shape[1], min(opts.auto_bits), opts.group_size, opts.sym)[0]
                       .stored_bytes(*m.weight.shape) for n, m in mods.items()) * 8 / n_weights
        if opts.target_bpw < smallest:
            raise UsageError(f"--target-bpw {opts.target_bpw} is below the smallest plan ({smallest:.3f} bits per "
                             f"weight with {min(opts.auto_bits)}-bit layers); pass at least {smallest:.3f}")
    return Source(cfg, tok, model, mods, fixed_plan)


def calibrate(opts: QuantizeOptions, src: Source) -> tuple[torch.Tensor | None, str | None]:
    """Calibration windows from the head of --calib and its held-out tail (None, None without --calib)."""
    from itera.data import load_text, split_heldout
    from itera.train import calibration_ids

    if not opts.calib:
        return None, None
    text = load_text(opts.calib, purpose="train", field=opts.text_field).text
    head, held = split_heldout(text, opts.holdout)
    tokens = torch.tensor(src.tokenizer.encode(head, add_bos=False), dtype=torch.long)
    seqlen = min(opts.calib_seqlen, src.cfg.max_position_embeddings)
    return calibration_ids(tokens, opts.calib_samples, seqlen, opts.seed).to(opts.device), held


def choose_layers(opts: QuantizeOptions, src: Source, calib: torch.Tensor | None, reporter: Reporter
                  ) -> tuple[dict[str, LayerQuant], dict | None, list[dict]]:
    """How each layer is quantized, the sensitivities behind a measured ``auto`` plan, and the
    fallbacks layers' widths forced."""
    fit = {n: {b: fit_layer(n, m.weight.shape[1], b, opts.group_size, opts.sym)
               for b in (opts.auto_bits if opts.method == "auto" else (opts.bits,))} for n, m in src.mods.items()}
    sens, bits = None, src.fixed_plan
    if opts.method != "auto":
        bits = {n: opts.bits for n in src.mods}
    elif bits is None:
        reporter.log(f"measuring sensitivity of {len(src.mods)} layers at {list(opts.auto_bits)} bits")
        task = reporter.task("sensitivity", total=len(src.mods), unit="layers")
        try:
            sens = sensitivities(src.model, src.mods, calib[: min(8, len(calib))],
                                 {n: {b: q for b, (q, _) in fit[n].items()} for n in src.mods}, task.update)
        finally:
            task.close()
        costs = {n: {b: fit[n][b][0].stored_bytes(*src.mods[n].weight.shape) for b in opts.auto_bits}
                 for n in src.mods}
        n_weights = sum(m.weight.numel() for m in src.mods.values())
        bits = choose_plan(costs, sens, int(opts.target_bpw * n_weights / 8))
    chosen = {n: fit[n][bits[n]] if bits[n] in fit[n] else
              fit_layer(n, src.mods[n].weight.shape[1], bits[n], opts.group_size, opts.sym) for n in src.mods}
    return {n: q for n, (q, _) in chosen.items()}, sens, [fb for _, fb in chosen.values() if fb]


def round_unquantized(src: Source, plan: dict[str, LayerQuant]) -> dict[str, torch.Tensor]:
    """Everything not quantized is stored in float16: round it the same way in memory, so the
    model measured here is bit for bit the model that loads back. Returns those tensors."""
    keep = {}
    for name, t in src.model.state_dict().items():
        module = name.rsplit(".", 1)[0]
        if (module in plan and name.endswith(".weight")) or (src.cfg.tie_word_embeddings and name == "lm_head.weight"):
            continue
        keep[name] = t.half().cpu()
        with torch.no_grad():
            src.model.get_parameter(name).copy_(t.half().float())
    return keep


def write(opts: QuantizeOptions, src: Source, plan: dict[str, LayerQuant], tensors: dict) -> None:
    """The quantized checkpoint, through the one checkpoint writer, with its plan and options."""
    from itera.model.checkpoint import write_checkpoint

    config = src.cfg.to_dict()
    config["quantization_config"] = {
        "quant_method": QUANT_METHOD, "format_version": FORMAT_VERSION, "method": opts.method,
        "bits": opts.bits if opts.method != "auto" else None, "group_size": opts.group_size, "sym": opts.sym,
        "quantize_embeddings": opts.quantize_embeddings, "layers": {n: q.as_dict() for n, q in plan.items()}}
    config["torch_dtype"] = "float16"
    plan_file = {"bits": {n: q.bits for n, q in plan.items()}, "group_size": opts.group_size, "sym": opts.sym}
    write_checkpoint(opts.out, tensors, config, tokenizer_from=Path(opts.model), extra_files={
        "quant_plan.json": json.dumps(plan_file, indent=2) + "\n",
        "quantize_config.json": json.dumps(opts.as_params(), indent=2) + "\n"})


def _heldout_perplexity(src: Source, held: str | None, opts: QuantizeOptions) -> dict | None:
    from itera.evaluate import EvalOptions, evaluate_text
    from itera.runtime.torch_backend import TorchRuntime

    if not held:
        return None
    return evaluate_text(TorchRuntime(src.model, src.tokenizer, opts.device), held,
                         EvalOptions(max_tokens=opts.eval_tokens, bos=False), source="held-out")


# --------------------------------------------------------------------------- the job


def run_quantize(opts: QuantizeOptions, reporter: Reporter = SILENT) -> Outcome:
    """Validate, quantize, measure and write the quantized checkpoint to ``opts.out``."""
    return quantize_in_memory(opts, reporter)[0]


def quantize_in_memory(opts: QuantizeOptions, reporter: Reporter = SILENT) -> tuple[Outcome, torch.nn.Module]:
    """:func:`run_quantize`, also returning the quantized model as it is in memory."""
    from itera.model.checkpoint import weight_bytes

    from itera.runtime import resolve_device

    opts.validate()
    opts.device = resolve_device(opts.device)
    src = load_source(opts)
    calib, held = calibrate(opts, src)
    before = _heldout_perplexity(src, held, opts)
    t0 = time.perf_counter()
    plan, sens, fallbacks = choose_layers(opts, src, calib, reporter)
    for fb in fallbacks:
        reporter.log(f"fallback: {fb['tensor']} {fb['wanted']} -> {fb['used']} ({fb['reason']})")
    apply_method = opts.auto_base if opts.method == "auto" else opts.method
    reporter.log(f"quantizing {len(src.mods)} layers with {apply_method}")
    task = reporter.task("quantize", total=src.cfg.num_hidden_layers, unit="layers")
    try:
        tensors, figures = quantize_model(src.model, src.mods, plan, apply_method, calib, opts.damp, opts.act_order,
                                          task.update)
    finally:
        task.close()
    quant_seconds = time.perf_counter() - t0
    keep = round_unquantized(src, plan)
    after = _heldout_perplexity(src, held, opts)
    write(opts, src, plan, {**keep, **tensors})
    q_bytes = sum(t.numel() * t.element_size() for t in tensors.values())
    n_weights = sum(m.weight.numel() for m in src.mods.values())
    out_bytes, src_bytes = weight_bytes(opts.out), weight_bytes(opts.model)
    metrics = {
        "bits_per_weight": q_bytes * 8 / n_weights, "quantized_weights": n_weights,
        "file_bits_per_param": out_bytes * 8 / src.model.num_parameters(),
        "source_bytes": src_bytes, "quantized_bytes": out_bytes, "size_ratio": src_bytes / out_bytes,
        "quantize_seconds": quant_seconds,
        "perplexity_before": before["perplexity"] if before else None,
        "perplexity_after": after["perplexity"] if after else None,
        "eval_tokens": after["tokens"] if after else None,
        "mean_weight_error": sum(f["weight_error"] for f in figures.values()) / len(figures),
        "layers": figures, "fallbacks": fallbacks,
    }
    if before is None:
        metrics["perplexity_note"] = "no --calib text: perplexity not measured"
    if sens is not None:
        metrics["plan_bits"] = {n: q.bits for n, q in plan.items()}
        metrics["sensitivity_kl"] = sens
    outcome = Outcome(describe_artifact(opts.out, "checkpoint", "itera-quant"), metrics,
                      {**opts.as_params(), "applied_method": apply_method}, device=opts.device)
    return outcome, src.model
