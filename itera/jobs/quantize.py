"""``itera quantize``: the recipe, in phases: :func:`load_source`, :func:`calibrate`,
:func:`choose_layers` (the plan), :func:`quantize_model` (apply), :func:`write`, and the
figures measured before and after.

Methods: ``rtn`` (round-to-nearest), ``gptq`` (:mod:`itera.quant.gptq`) and ``auto`` (a GGUF block
type per tensor, embeddings and output head included, chosen from measured sensitivity under a
budget in the bytes of the GGUF file, :mod:`itera.quant.plan`). ``rtn`` and ``gptq`` store itera's
own layout (``--bits``, ``--group-size``), or with ``--gguf-type`` one GGML block type for every
layer (:mod:`itera.storage.ggml`).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from itera.errors import InputError, UsageError
from itera.options import flag, internal
from itera.progress import SILENT, Reporter, running
from itera.storage.layout import FORMAT_VERSION, LINEAR_SUFFIXES, QUANT_METHOD, SUPPORTED_BITS, LayerQuant
from itera.quant.budget import Budget, make_budget, read_plan
from itera.storage.ggml import TYPES
from itera.storage import by_name
from itera.storage.types import F16
from itera.quant.layerwise import quantize_model
from itera.quant.fisher import fisher_stats, probes_for
from itera.quant.plan import choose_plan, predicted_sensitivities, sensitivities
from itera.artifacts import describe_artifact
from itera.record import Outcome

METHODS = ("rtn", "gptq", "auto")
PLANNERS = ("predicted", "measured")
SENSITIVITY_WINDOWS, SENSITIVITY_TOKENS = 4, 128  # auto, measured: calibration text each option's KL is measured on
FISHER_DRAWS = 2  # auto, predicted: label draws per calibration sequence (see choose_layers)
# auto, predicted: calibration sequences for the Fisher pass, as many as FISHER_PARAM_WINDOWS allows between the two
# bounds: each sequence's probe has a relative standard error of about sqrt(2 / FISHER_DRAWS), so the count sets the
# predictions' noise; on the demo teacher (2M parameters) the mean |log(predicted / measured)| over matrix-type
# pairs was 0.30 with 8 sequences, 0.22 with 16, 0.18 with 32, while at 1.1B parameters 8 already take 393 s
FISHER_WINDOWS, FISHER_MAX_WINDOWS, FISHER_PARAM_WINDOWS = 8, 32, 1e9

# Importance data (each input's mean square, a diagonal) from the first 32 calibration sequences: on the demo
# teacher 32 sequences' differ from all 128's by 2.4% (median over matrices; 10.6% at most), while GPTQ's
# full Hessians take every sequence. At 1.1B parameters the other 96 would cost 3 more minutes.
IMPORTANCE_WINDOWS = 32
AUTO_TYPES = (*TYPES, F16.name)
# llama.cpp's choice when a row is not a multiple of a type's block (llama-quant.cpp's fallback)
ROW_FALLBACK = {"Q2_K": "Q4_0", "Q3_K": "Q4_0", "IQ4_XS": "IQ4_NL", "Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0"}


def fisher_windows(params: int, available: int) -> int:
    """Calibration sequences for the predicted planner's Fisher pass: 32 up to 31M parameters, fewer
    above, down to 8 from 125M parameters on (never more than there are)."""
    return min(available, max(FISHER_WINDOWS, min(FISHER_MAX_WINDOWS, int(FISHER_PARAM_WINDOWS // max(params, 1)))))


@dataclass
class QuantizeOptions:
    """What ``itera quantize`` was asked to do; written next to the checkpoint as quantize_config.json."""

    model: Path = flag("--model")  # the CLI's default: the artifact of the record on stdin
    out: Path = flag("--out")
    method: str = flag("--method", default="gptq")
    bits: int = flag("--bits", default=4)
    group_size: int | None = flag("--group-size", default=None)  # None: one scale per output channel
    sym: bool = flag("--sym", default=True)
    calib: str | None = flag("--calib", default=None)
    calib_samples: int = flag("--calib-samples", default=128)
    calib_seqlen: int = flag("--calib-seqlen", default=256)
    damp: float = flag("--damp", default=0.01)
    act_order: bool = flag("--act-order", default=False)
    # rtn/gptq: store every layer as this GGML block type (e.g. Q4_K)
    gguf_type: str | None = flag("--gguf-type", default=None)
    # auto: bits per weight over every tensor of the GGUF file
    target_bpw: float | None = flag("--target-bpw", default=None)
    target_bytes: int | None = flag("--target-bytes", default=None)  # auto: bytes of the GGUF file
    # auto: candidate types (or "Q4_0,Q4_K,Q8_0,F16")
    auto_types: tuple[str, ...] | str = flag("--auto-types", default=AUTO_TYPES, cli_default="all",
                                             why="validate() reads 'all' as every type, AUTO_TYPES")
    auto_base: str = flag("--auto-base", default="gptq")  # auto: how the chosen plan is applied (rtn or gptq)
    # auto: each option's KL predicted from one backward pass, or measured by a forward pass per option
    planner: str = flag("--planner", default="predicted")
    plan: Path | None = flag("--plan", default=None)  # a plan (module -> type) written by an earlier `auto` run
    quantize_embeddings: bool = flag("--quantize-embeddings", default=False)
    eval_tokens: int = flag("--eval-tokens", default=4096)
    holdout: float = internal("the share of the --calib text's tail held out for perplexity: fixed, and the same "
                              "share `itera export --calib` holds out", default=0.1)
    seed: int = flag("--seed", default=0)
    # where calibration and GPTQ run (cuda, cuda:N, auto)
    device: str = flag("--device", default="cpu", cli_default="auto",
                       why="the job resolves auto (cuda when available); a library caller gets the cpu unless it asks")
    text_field: str = flag("--text-field", default="text")
    force: bool = flag("--force", default=False)
    threads: int | None = flag("--threads", default=None)  # torch's CPU threads; None: torch's own default

    def validate(self) -> "QuantizeOptions":
        if isinstance(self.auto_types, str):
            self.auto_types = AUTO_TYPES if self.auto_types.strip().lower() == "all" else \
                tuple(t.strip().upper() for t in self.auto_types.split(",") if t.strip())
        if self.gguf_type is not None:
            self.gguf_type = self.gguf_type.upper()
        if self.method not in METHODS:
            raise UsageError(f"unknown --method {self.method!r}; use rtn, gptq or auto")
        if self.bits not in SUPPORTED_BITS:
            raise UsageError(f"--bits {self.bits} is not supported; use 8, 4, 3 or 2")
        if self.group_size is not None and self.group_size < 1:
            raise UsageError(f"--group-size must be positive (got {self.group_size})")
        if self.method in ("gptq", "auto") and not self.calib:
            raise UsageError(f"--method {self.method} needs calibration text: pass --calib FILE_OR_DATASET")
        if self.gguf_type is not None and self.gguf_type not in TYPES:
            raise UsageError(f"unknown --gguf-type {self.gguf_type!r}; itera writes {', '.join(TYPES)}")
        self._validate_auto()
        if self.calib_samples < 1 or self.calib_seqlen < 2 or self.eval_tokens < 2:
            raise UsageError("--calib-samples must be >= 1, --calib-seqlen and --eval-tokens >= 2")
        if not 0 < self.damp < 1:
            raise UsageError(f"--damp must be between 0 and 1 (got {self.damp})")
        if self.threads is not None and self.threads < 1:
            raise UsageError(f"--threads must be at least 1 (got {self.threads})")
        return self

    def _validate_auto(self) -> None:
        budgets = [b for b in (self.target_bpw, self.target_bytes) if b is not None]
        if self.method != "auto":
            if budgets or self.plan is not None:
                raise UsageError("--target-bpw, --target-bytes and --plan go with --method auto")
            return
        if len(budgets) + (self.plan is not None) != 1:
            raise UsageError("--method auto needs one of --target-bpw (e.g. 4.5), --target-bytes (e.g. 2000000) "
                             "or --plan FILE")
        if self.group_size is not None or self.gguf_type is not None:
            raise UsageError("--group-size and --gguf-type do not go with --method auto: its candidates are GGUF "
                             "block types with their own block sizes (choose them with --auto-types)")
        unknown = [t for t in self.auto_types if t not in AUTO_TYPES]
        if unknown or not self.auto_types:
            raise UsageError(f"--auto-types must be a comma-separated list of {', '.join(AUTO_TYPES)} "
                             f"(got {','.join(self.auto_types)!r})")
        if self.auto_base not in ("rtn", "gptq"):
            raise UsageError("--auto-base must be rtn or gptq")
        if self.planner not in PLANNERS:
            raise UsageError(f"--planner must be predicted or measured (got {self.planner!r})")
        if self.plan is not None:
            from itera.fsio import check_input_file

            check_input_file(Path(self.plan), "--plan", "pass the quant_plan.json an earlier `itera quantize "
                             "--method auto` wrote", UsageError)
        for name in ("target_bpw", "target_bytes"):
            v = getattr(self, name)
            if v is not None and not (v > 0 and v != float("inf")):
                raise UsageError(f"--{name.replace('_', '-')} must be a positive number (got {v})")

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
        d["auto_types"] = list(self.auto_types)
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
    return q, {"tensor": name, "wanted": LayerQuant(bits, group_size, sym).label(), "used": q.label(),
               "reason": "; ".join(reasons)}


def fit_type(name: str, n_in: int, gguf_type: str):
    """The GGML type a layer of ``n_in`` input columns gets for ``gguf_type``, and the fallback taken:
    llama.cpp's own choice when a row is not a multiple of the type's block, F16 when no block fits."""
    t = gguf_type
    while not by_name(t).fits(n_in):
        t = ROW_FALLBACK.get(t, F16.name)
    if t == gguf_type:
        return TYPES[t], None
    block = TYPES[gguf_type].block
    return by_name(t), {"tensor": name, "wanted": gguf_type, "used": t,
                                             "reason": f"its {n_in} input columns are not a multiple of {block}"}


# --------------------------------------------------------------------------- phases


@dataclass
class Source:
    cfg: object
    tokenizer: object
    model: torch.nn.Module
    mods: dict[str, torch.nn.Module]  # the matrices to quantize (auto: every matrix of the GGUF file)
    budget: Budget | None = None  # auto with --target-bpw / --target-bytes
    fixed_plan: dict[str, str] | None = None  # auto with --plan: module -> type
    layout: object = None  # the GGUF file's layout (None: the model has no GGUF export)
    heldout: dict | None = None  # which characters and tokens of --calib are held out (itera.data.heldout_split)
    planner: dict | None = None  # auto: what the sensitivities were found from (the record's "planner")


def check_source(opts: QuantizeOptions):
    """Everything cheap, before the weights are read: the config against the weights, the
    tokenizer, and for ``auto`` the budget (refused with the achievable range) or the plan."""
    from itera.errors import UnsupportedModelError
    from itera.export.gguf import layout
    from itera.model.checkpoint import load_checked_config, load_config

    cfg = load_config(opts.model)
    if cfg.quantization:
        q = cfg.quantization
        raise InputError(f"{opts.model} is already quantized ({q.get('method')}, {q.get('bits')} bits); "
                         "pass the float checkpoint it came from")
    load_checked_config(opts.model)
    try:
        lay = layout(opts.model)
    except UnsupportedModelError as e:
        if opts.method == "auto":
            raise UnsupportedModelError(f"--method auto plans a GGUF file, and {e}") from None
        lay = None
    if opts.method != "auto":
        return cfg, lay, None, None
    if opts.plan is not None:
        return cfg, lay, None, read_plan(opts.plan, lay.matrices)
    return cfg, lay, make_budget(lay, opts.auto_types, opts.target_bytes, opts.target_bpw), None


def load_source(opts: QuantizeOptions) -> Source:
    """The float model and the layers to quantize, after :func:`check_source`."""
    from itera.model.checkpoint import load_model
    from itera.tokenizer import Tokenizer

    cfg, lay, budget, fixed_plan = check_source(opts)
    tok = Tokenizer.from_dir(opts.model)
    tok.check_fits(cfg.vocab_size, str(opts.model))
    model, _ = load_model(opts.model, device=opts.device)
    mods = target_modules(model, opts.quantize_embeddings or opts.method == "auto")
    return Source(cfg, tok, model, mods, budget, fixed_plan, lay)


def calibrate(opts: QuantizeOptions, src: Source, reporter: Reporter = SILENT) -> tuple[torch.Tensor | None, str | None]:
    """Calibration windows from the head of --calib and its held-out tail (None, None without --calib).
    Windows are drawn at random places; a text shorter than all of them end to end gives windows
    that overlap, and says so (the same tokens counted twice are not more calibration)."""
    from itera.data import canonical, heldout_split, load_text, split_heldout
    from itera.train import calibration_ids

    if not opts.calib:
        return None, None
    text = load_text(opts.calib, purpose="train", field=opts.text_field).text
    head, held = split_heldout(text, opts.holdout)
    tokens = torch.tensor(src.tokenizer.encode(head, add_bos=False), dtype=torch.long)
    src.heldout = heldout_split(canonical(opts.calib, purpose="train"), text, opts.holdout, tokens.numel(),
                                len(src.tokenizer.encode(held, add_bos=False)), None, "calibration")
    seqlen = min(opts.calib_seqlen, src.cfg.max_position_embeddings)
    windows = calibration_ids(tokens, opts.calib_samples, seqlen, opts.seed)  # refuses less than one window
    if tokens.numel() < opts.calib_samples * seqlen:
        reporter.log(f"warning: the calibration text gives {tokens.numel():,} tokens, fewer than --calib-samples "
                     f"{opts.calib_samples} x --calib-seqlen {seqlen} = {opts.calib_samples * seqlen:,}: the windows "
                     "overlap; pass more text or fewer samples")
    return windows.to(opts.device), held


def module_importance(src: Source, calib: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """Importance data (mean square of each input, over the first IMPORTANCE_WINDOWS calibration
    sequences) per module to quantize; the tied embedding matrix takes the output head's, the role
    in which llama.cpp multiplies by it."""
    from itera.quant.importance import input_mean_squares

    if calib is None:
        return {}
    imp = input_mean_squares(src.model, calib[:IMPORTANCE_WINDOWS])
    out = {n: imp[n] for n in src.mods if n in imp}
    if src.cfg.tie_word_embeddings and "model.embed_tokens" in src.mods:
        out["model.embed_tokens"] = imp["lm_head"]
    return out


def choose_layers(opts: QuantizeOptions, src: Source, calib: torch.Tensor | None, importance: dict,
                  reporter: Reporter, stages: dict | None = None) -> tuple[dict, dict | None, list[dict]]:
    """How each matrix is stored (a LayerQuant, a GGML type, or F16), the sensitivities behind an
    ``auto`` plan, and the fallbacks that row lengths forced. ``stages``: seconds per stage, added to.

    ``--planner predicted`` quantizes each tensor at its two reference types (the probes), runs one
    forward and FISHER_DRAWS backward passes over the first :func:`fisher_windows` calibration sequences
    (8 to 32: 2,048 to 8,192 tokens at the default length; on an 8M-parameter model with 8, two label seeds gave median
    predicted / measured ratios of 0.90 and 0.93) and quantizes a sample of each tensor's rows once
    per type (stages ``sensitivities`` and ``predictions``); ``measured`` runs the model from the
    tensor's layer on for every tensor and type (stage ``sensitivities``: hours at 1B parameters)."""
    stages = {} if stages is None else stages
    if opts.method != "auto":
        if opts.gguf_type is not None:
            chosen = {n: fit_type(n, m.weight.shape[1], opts.gguf_type) for n, m in src.mods.items()}
        else:
            chosen = {n: fit_layer(n, m.weight.shape[1], opts.bits, opts.group_size, opts.sym)
                      for n, m in src.mods.items()}
        return {n: q for n, (q, _) in chosen.items()}, None, [fb for _, fb in chosen.values() if fb]
    sens, types = None, src.fixed_plan
    if types is None:
        costs = src.budget.costs
        options = {n: {t: by_name(t) for t in costs[n]} for n in src.mods}
        t0 = time.perf_counter()
        if opts.planner == "measured":
            reporter.log(f"measuring the sensitivity of {len(src.mods)} tensors to {len(opts.auto_types)} types")
            with running(reporter, "sensitivity", len(src.mods), "tensors") as task:
                windows = calib[:SENSITIVITY_WINDOWS, :SENSITIVITY_TOKENS]
                sens = sensitivities(src.model, src.mods, windows, options, importance, task.update)
            stages["sensitivities"] = time.perf_counter() - t0
        else:
            windows = calib[:fisher_windows(src.model.num_parameters(), calib.shape[0])]
            reporter.log(f"the Fisher pass: {windows.shape[0]} calibration sequences, {FISHER_DRAWS} label draws each")
            with running(reporter, "probes", len(src.mods), "tensors") as task:  # apart: each ETA its own
                probes = probes_for(src.model, src.mods, options, importance, task.update)
            with running(reporter, "fisher", windows.shape[0], "sequences") as task:
                stats = fisher_stats(src.model, windows, seed=opts.seed, draws=FISHER_DRAWS, probes=probes,
                                     progress=task.update)
            del probes
            stages["sensitivities"] = time.perf_counter() - t0
            reporter.log(f"predicting the sensitivity of {len(src.mods)} tensors to {len(opts.auto_types)} types")
            with running(reporter, "sensitivity", len(src.mods), "tensors") as task:
                sens = predicted_sensitivities(src.model, src.mods, stats, options, importance, task.update)
            stages["predictions"] = time.perf_counter() - t0 - stages["sensitivities"]
        src.planner = {"planner": opts.planner, "calibration_sequences": windows.shape[0],
                       "calibration_tokens": windows.numel(),
                       "label_draws": FISHER_DRAWS if opts.planner == "predicted" else None}
        t0 = time.perf_counter()
        types = choose_plan(costs, sens, src.budget.available)
        stages["plan"] = time.perf_counter() - t0
    return {n: by_name(t) for n, t in types.items()}, sens, []


def round_unquantized(src: Source, plan: dict) -> dict[str, torch.Tensor]:
    """Every matrix not quantized is stored in float16: round it the same way in memory, so the
    model measured here is bit for bit the model that loads back. Returns those tensors.

    1-D tensors (the norms) keep their float32 values, as llama.cpp's quantizer keeps them and as
    the GGUF file stores them (float16 saved no bytes there and changed every file the same way).
    On the demo teacher this did not move the NLL change on another domain's text."""
    keep = {}
    for name, t in src.model.state_dict().items():
        module = name.rsplit(".", 1)[0]
        if (module in plan and name.endswith(".weight")) or (src.cfg.tie_word_embeddings and name == "lm_head.weight"):
            continue
        if t.dim() == 1:
            keep[name] = t.float().cpu()
            continue
        keep[name] = t.half().cpu()
        with torch.no_grad():
            src.model.get_parameter(name).copy_(t.half().float())
    return keep


def write(opts: QuantizeOptions, src: Source, plan: dict, tensors: dict) -> None:
    """The quantized checkpoint, through the one checkpoint writer, with its plan and options.
    ``plan``: every matrix's type; auto's quant_plan.json names them all, F16 ones too, so that
    ``--plan`` takes it back."""
    from itera.model.checkpoint import write_checkpoint

    config = src.cfg.to_dict()
    auto = opts.method == "auto"
    config["quantization_config"] = {
        "quant_method": QUANT_METHOD, "format_version": FORMAT_VERSION, "method": opts.method,
        "bits": opts.bits if not (auto or opts.gguf_type) else None, "group_size": opts.group_size,
        "sym": opts.sym, "gguf_type": opts.gguf_type, "quantize_embeddings": opts.quantize_embeddings or auto,
        "layers": {n: q.as_dict() for n, q in plan.items() if q.quantized}}
    config["torch_dtype"] = "float16"
    extra = {"quantize_config.json": json.dumps(opts.as_params(), indent=2) + "\n"}
    if auto:
        extra["quant_plan.json"] = json.dumps({"types": {n: q.label() for n, q in plan.items()}}, indent=2) + "\n"
    write_checkpoint(opts.out, tensors, config, tokenizer_from=Path(opts.model), extra_files=extra)


def _heldout_perplexity(src: Source, held: str | None, opts: QuantizeOptions) -> dict | None:
    from itera.scoring import EvalOptions, evaluate_text
    from itera.runtime.torch_backend import TorchRuntime

    if not held:
        return None
    return evaluate_text(TorchRuntime(src.model, src.tokenizer, opts.device), held,
                         EvalOptions(max_tokens=opts.eval_tokens, bos=False), source="held-out")


def gguf_types(src: Source, plan: dict) -> dict[str, str]:
    """module -> the type `itera export --format gguf` writes for it (GGUF types as stored; itera's
    symmetric group-32 4/8-bit layers as Q4_0/Q8_0; F16 otherwise)."""
    return {n: q.gguf_type or F16.name for n, q in plan.items()}


# --------------------------------------------------------------------------- the job


def run_quantize(opts: QuantizeOptions, reporter: Reporter = SILENT) -> Outcome:
    """Validate, quantize, measure and write the quantized checkpoint to ``opts.out``."""
    return quantize_in_memory(opts, reporter)[0]


def quantize_in_memory(opts: QuantizeOptions, reporter: Reporter = SILENT) -> tuple[Outcome, torch.nn.Module]:
    """:func:`run_quantize`, also returning the quantized model as it is in memory."""
    from itera.runtime import resolve_device

    opts.validate()
    opts.device = resolve_device(opts.device)
    if opts.threads is not None:
        torch.set_num_threads(opts.threads)
    opts.threads = torch.get_num_threads()  # the record says what was used
    stages = {}
    clock = time.perf_counter()

    def lap(stage: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        stages[stage] = stages.get(stage, 0.0) + now - clock
        clock = now

    src = load_source(opts)
    lap("load")
    calib, held = calibrate(opts, src, reporter)
    before = _heldout_perplexity(src, held, opts)
    lap("perplexity_before")
    t0 = time.perf_counter()
    importance = module_importance(src, calib) if opts.method == "auto" or opts.gguf_type else {}
    lap("calibration_pass")
    plan, sens, fallbacks = choose_layers(opts, src, calib, importance, reporter, stages)
    clock = time.perf_counter()
    if fallbacks:  # one line however many tensors fell back; the record lists every one
        from itera.export.gguf import fallback_summary

        reporter.log(fallback_summary(fallbacks))
    apply_method = opts.auto_base if opts.method == "auto" else opts.method
    reporter.log(f"quantizing {len(src.mods)} tensors with {apply_method}")
    with running(reporter, "quantize", src.cfg.num_hidden_layers, "layers") as task:
        tensors, figures = quantize_model(src.model, src.mods, plan, apply_method, calib, opts.damp, opts.act_order,
                                          task.update, importance)
    quant_seconds = time.perf_counter() - t0
    lap("quantize")
    stored = {n: q for n, q in plan.items() if q.quantized}
    keep = round_unquantized(src, stored)
    after = _heldout_perplexity(src, held, opts)
    lap("perplexity_after")
    write(opts, src, plan, {**keep, **tensors})
    lap("write")
    metrics = _metrics(opts, src, plan, tensors, figures, before, after)
    metrics.update(quantize_seconds=quant_seconds, fallbacks=fallbacks,
                   stage_seconds={k: round(v, 3) for k, v in stages.items()})
    if sens is not None or src.fixed_plan is not None:
        metrics["plan_types"] = {n: q.label() for n, q in plan.items()}
        metrics["sensitivity_kl"] = sens
        if src.planner is not None:
            metrics["planner"] = src.planner
    if src.budget is not None:
        metrics["budget"] = src.budget.figures()
    outcome = Outcome(describe_artifact(opts.out, "checkpoint", "itera-quant"), metrics,
                      {**opts.as_params(), "applied_method": apply_method}, device=opts.device)
    return outcome, src.model


def _metrics(opts, src: Source, plan: dict, tensors: dict, figures: dict, before, after) -> dict:
    from itera.model.checkpoint import weight_bytes
    from itera.quant.budget import gguf_figures

    n_weights = sum(m.weight.numel() for m in src.mods.values())
    q_bytes = sum(t.numel() * t.element_size() for t in tensors.values()) + sum(
        q.tensor_bytes(*src.mods[n].weight.shape) for n, q in plan.items() if not q.quantized)
    out_bytes, src_bytes = weight_bytes(opts.out), weight_bytes(opts.model)
    metrics = {
        "bits_per_weight": q_bytes * 8 / n_weights, "quantized_weights": n_weights,
        "file_bits_per_param": out_bytes * 8 / src.model.num_parameters(),
        "source_bytes": src_bytes, "quantized_bytes": out_bytes, "size_ratio": src_bytes / out_bytes,
        "perplexity_before": before["perplexity"] if before else None,
        "perplexity_after": after["perplexity"] if after else None,
        "eval_tokens": after["tokens"] if after else None,
        "mean_weight_error": sum(f["weight_error"] for f in figures.values()) / len(figures),
        "layers": figures,
    }
    if src.layout is not None:  # what `itera export --format gguf` will write
        metrics.update(gguf_figures(src.layout, gguf_types(src, plan)))
    if before is None:
        metrics["perplexity_note"] = "no --calib text: perplexity not measured"
    elif src.heldout is not None:  # which tokens: distill's held-out tail is another share of another text
        metrics["heldout_split"] = {**src.heldout, "tokens_scored": after["tokens"]}
    return metrics
