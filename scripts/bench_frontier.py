"""Size against quality: itera's GGUF files against llama.cpp's quantizer, byte for byte.

For each of llama.cpp's types (Q2_K, Q3_K_M, Q4_0, Q4_K_M, Q5_K_M, Q6_K, Q8_0 by default) the F32
export of --model is quantized by llama.cpp's own quantizer, without and with importance data
(itera's, from the --calib windows that ``itera quantize`` calibrates on by default, as
llama-imatrix collects it); then ``itera quantize --method auto`` is
given the smaller of those two files' sizes as ``--target-bytes`` and its checkpoint is exported
with ``itera export --format gguf`` (verified as usual). Every file is scored by llama.cpp on the
same windows of held-out --text: perplexity, and mean KL(F32 || file) per token from llama.cpp's
own logits. The goal: at every llama.cpp point, itera's increase in perplexity over F32 is at most
half the better llama.cpp file's.

Every difference comes with its standard error over the scored windows (the same tokens scored by
both files, so the error is of the paired difference): ``delta_perplexity_se`` for each file, and
``goal_margin`` (half the better llama.cpp increase minus itera's; positive inside the goal) with
its ``se``. ``verdict`` is "met", "not met" (outside by more than two standard errors), or "within
noise" (outside, by less than two: this much text cannot tell).

The sensitivities behind the plans do not depend on the budget: the first ``auto`` run measures
them, and the other budgets reuse them through ``--plan`` (what a user does to try several sizes).

``--calib-seeds N`` makes every point again from calibration seeds 1 .. N-1 (itera with the same
plan, llama.cpp with that seed's importance data) and reports each method's NLL change over the
draws, mean and spread (``calib_draws``): a file's NLL change on held-out text, especially of
another domain, moves with the calibration windows far more than the windows' standard error says.

Prints one JSON object and writes it, and the frontier as PNG, under --out (default
runs/bench/frontier-<model's parent>-<model>/, or runs/bench/frontier-large/). Files already
there are reused: remove the directory after changing the quantizers.

    python scripts/bench_frontier.py --model runs/demo/teacher --text pydocs@test --calib pydocs@train
    python scripts/bench_frontier.py --model large --text pydocs@test --calib pydocs@train

``--model large`` trains a hidden-512 model once (cached under runs/bench/frontier-large/).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

LLAMA_TYPES = ("Q2_K", "Q3_K_M", "Q4_0", "Q4_K_M", "Q5_K_M", "Q6_K", "Q8_0")
LARGE = ROOT / "runs" / "bench" / "frontier-large"
LARGE_TRAIN = ["--alpha", "0", "--tokenizer", "bpe:2048", "--layers", "4", "--hidden", "512", "--heads", "8",
               "--kv-heads", "2", "--ffn", "1280", "--data", "pydocs@train", "--steps", "800", "--lr", "3e-3",
               "--warmup-steps", "40", "--batch-size", "16", "--seq-len", "128", "--eval-every", "100"]
# 1.64M tokens, about 3.6 passes over pydocs@train: held-out perplexity 72.2 and still falling at
# step 800 (76.6 at 700), not yet overfitting; about 20 minutes on 2 cores. 250 steps of 8 left it
# at about 200, where llama.cpp's rounding moved perplexity either way by more than its KL explains.


def log(msg: str) -> None:
    print(f"[frontier] {msg}", file=sys.stderr, flush=True)


def large_model() -> Path:
    ckpt = LARGE / "teacher"
    if not (ckpt / "config.json").is_file():
        LARGE.mkdir(parents=True, exist_ok=True)
        log(f"training the larger model once into {ckpt}")
        subprocess.run([str(ROOT / ".venv" / "bin" / "itera"), "distill", *LARGE_TRAIN, "--out", str(ckpt)],
                       check=True, stdout=subprocess.DEVNULL)
    return ckpt


# --------------------------------------------------------------------------- scoring in llama.cpp


class Scorer:
    """Perplexity and KL to the F32 file, all from llama.cpp's logits on the same windows.

    Each file's negative log-likelihood is also kept per window, so that a difference between two
    files comes with its standard error over windows (paired: the same tokens, scored twice)."""

    def __init__(self, tokenizer, text: str, tokens: int, window: int, stride: int, threads: int | None):
        from itera.scoring import windows

        ids = tokenizer.encode(text, add_bos=False)
        if tokenizer.add_bos and tokenizer.bos_id is not None:
            ids = [tokenizer.bos_id] + ids
        self.ids = ids[:tokens]
        self.plan = list(windows(len(self.ids), window, stride))
        self.counts = np.array([n for _, _, n in self.plan], dtype=np.float64)
        self.threads = threads
        self.ref: list[np.ndarray] | None = None  # F32's log-probabilities per window
        self.nll: dict[str, np.ndarray] = {}  # per-window NLL sums, by file

    def score(self, path: Path) -> dict:
        from itera.runtime.llamacpp_backend import LlamaCppRuntime

        nll, kl, logps = np.zeros(len(self.plan)), 0.0, []
        with LlamaCppRuntime(path, threads=self.threads) as rt:
            for i, (b, e, n) in enumerate(self.plan):
                x = rt.logits(self.ids[b:e])[e - b - n - 1: e - b - 1].astype(np.float64)
                lp = x - x.max(-1, keepdims=True)
                lp -= np.log(np.exp(lp).sum(-1, keepdims=True))
                nll[i] = -lp[np.arange(n), self.ids[e - n: e]].sum()
                if self.ref is None:
                    logps.append(lp.astype(np.float32))
                else:
                    ref = self.ref[i].astype(np.float64)
                    kl += (np.exp(ref) * (ref - lp)).sum()
        scored = self.counts.sum()
        if self.ref is None:
            self.ref = logps
        self.nll[str(path)] = nll
        return {"perplexity": math.exp(nll.sum() / scored), "kl": kl / scored, "tokens": int(scored)}

    def delta(self, weights: dict[Path, float]) -> tuple[float, float]:
        """sum(w * mean NLL of file) over ``weights``, and its standard error over windows.

        With weights {a: 1, f32: -1} that is log(ppl_a / ppl_f32); with {a: ppl_a, f32: -ppl_f32}
        its error is the error of ppl_a - ppl_f32 (to first order). Windows are taken as independent
        samples (their scored tokens do not overlap; their contexts do, so this is a lower bound)."""
        per = sum(w * self.nll[str(f)] for f, w in weights.items()) / self.counts  # per-window mean
        mean = float((per * self.counts).sum() / self.counts.sum())
        resid = (per - mean) * self.counts
        k = len(self.counts)
        return mean, float(math.sqrt((resid ** 2).sum() * k / max(k - 1, 1)) / self.counts.sum())


# --------------------------------------------------------------------------- the files


def llama_files(f32: Path, out: Path, types, importance, threads) -> dict[str, Path]:
    return {f"{t}/{tag}": llama_file(f32, out / f"llama-{t}-{tag}.gguf", t, imp, threads)
            for t in types for tag, imp in (("plain", None), ("imatrix", importance))}


def llama_file(f32: Path, dst: Path, gguf_type: str, importance, threads) -> Path:
    """llama.cpp's quantizer from ``f32`` to ``dst`` (through a temporary name), unless already there."""
    from itera.export.gguf import llama_quantize

    if not dst.exists():
        tmp = dst.with_name(dst.name + ".tmp")
        llama_quantize(f32, tmp, gguf_type, threads, importance)
        os.replace(tmp, dst)
    return dst


def itera_file(model: Path, out: Path, name: str, calib: str, budget: int, plan: Path | None, threads,
               seed: int = 0, planner: str = "predicted") -> tuple:
    """itera auto at ``budget`` bytes (measuring, or with ``plan``), exported; (gguf, quantize record)."""
    from itera.jobs.export import ExportOptions, run_export
    from itera.jobs.quantize import QuantizeOptions, run_quantize

    ckpt, gguf = out / f"itera-{name}", out / f"itera-{name}.gguf"
    rec_path = out / f"itera-{name}.quantize.json"
    if not gguf.exists():
        q = QuantizeOptions(model=model, out=ckpt, method="auto", calib=calib, force=True, seed=seed, planner=planner,
                            **({"plan": plan} if plan else {"target_bytes": budget}))
        rec_path.write_text(json.dumps({"metrics": run_quantize(q).metrics}))
        run_export(ExportOptions(model=ckpt, out=gguf, format="gguf", threads=threads, force=True))
    return gguf, json.loads(rec_path.read_text())


def plan_for(model: Path, sens: dict, budget: int, path: Path) -> Path:
    """quant_plan.json for ``budget`` bytes from already measured sensitivities."""
    from itera.export.gguf import layout
    from itera.quant.budget import make_budget
    from itera.jobs.quantize import AUTO_TYPES
    from itera.quant.plan import choose_plan

    b = make_budget(layout(model), AUTO_TYPES, budget, None)
    path.write_text(json.dumps({"types": choose_plan(b.costs, sens, b.available)}))
    return path


# --------------------------------------------------------------------------- the run


def run(args) -> dict:
    import torch

    from itera.data import load_text
    from itera.export.gguf import write_gguf
    from itera.jobs.quantize import QuantizeOptions
    from itera.model.checkpoint import load_model
    from itera.quant.importance import gguf_importance, input_mean_squares
    from itera.tokenizer import Tokenizer
    from itera.train import calibration_ids

    model = large_model() if args.model == "large" else Path(args.model)
    out = Path(args.out or (LARGE if args.model == "large" else
                            ROOT / "runs" / "bench" / f"frontier-{model.parent.name}-{model.name}"))
    out.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer.from_dir(model)
    f32 = out / "f32.gguf"
    if not f32.exists():
        write_gguf(model, f32.with_name("f32.tmp"), "F32")
        os.replace(f32.with_name("f32.tmp"), f32)
    log("importance data from the calibration text")
    m, cfg = load_model(model)
    calib_ids = torch.tensor(tok.encode(load_text(args.calib, purpose="train").text, add_bos=False))
    # llama.cpp's importance data per calibration seed (--calib-seeds draws the others), from the
    # windows itera's quantize calibrates on by default
    seed_importance = {s: gguf_importance(input_mean_squares(m, calibration_ids(
        calib_ids, QuantizeOptions.calib_samples, QuantizeOptions.calib_seqlen, s)), cfg)
        for s in range(max(1, args.calib_seeds))}
    importance = seed_importance[0]
    del m
    files = llama_files(f32, out, args.types, importance, args.threads)
    scorer = Scorer(tok, load_text(args.text, purpose="eval").text, args.tokens, args.window, args.stride,
                    args.threads)
    base = {"bytes": f32.stat().st_size, **scorer.score(f32)}
    log(f"F32: {base['bytes']:,} bytes, perplexity {base['perplexity']:.3f}")
    rows, sens = [], None
    for t in args.types:
        row = {"type": t}
        for tag in ("plain", "imatrix"):
            f = files[f"{t}/{tag}"]
            row[f"llama_{tag}"] = {"bytes": f.stat().st_size, **scorer.score(f)}
        budget = min(row["llama_plain"]["bytes"], row["llama_imatrix"]["bytes"])
        name = t if args.planner == "predicted" else f"{t}-{args.planner}"
        plan = plan_for(model, sens, budget, out / f"plan-{name}.json") if sens else None
        t0 = time.perf_counter()
        gguf, rec = itera_file(model, out, name, args.calib, budget, plan, args.threads, planner=args.planner)
        sens = sens or rec["metrics"]["sensitivity_kl"]
        row["itera"] = {"bytes": gguf.stat().st_size, **scorer.score(gguf), "budget": budget,
                        "types": _count(rec["metrics"]["plan_types"]), "seconds": time.perf_counter() - t0,
                        "stage_seconds": rec["metrics"].get("stage_seconds")}
        paths = {"llama_plain": files[f"{t}/plain"], "llama_imatrix": files[f"{t}/imatrix"], "itera": gguf}
        ppl = {k: row[k]["perplexity"] for k in paths}
        for k, f in paths.items():
            row[k]["delta_perplexity"] = ppl[k] - base["perplexity"]
            row[k]["delta_perplexity_se"] = scorer.delta({f: ppl[k], f32: -base["perplexity"]})[1]
        best_key = min(("llama_plain", "llama_imatrix"), key=lambda k: row[k]["delta_perplexity"])
        best = row[best_key]["delta_perplexity"]
        row["itera_delta_over_best_llama"] = row["itera"]["delta_perplexity"] / best if best > 0 else None
        fits = row["itera"]["bytes"] <= budget
        row["goal_met"] = fits and row["itera"]["delta_perplexity"] <= 0.5 * best
        # how far inside (+) or outside (-) the goal, in perplexity, with its paired standard error
        margin = 0.5 * best - row["itera"]["delta_perplexity"]
        se = scorer.delta({paths[best_key]: 0.5 * ppl[best_key], f32: 0.5 * base["perplexity"],
                           gguf: -ppl["itera"]})[1]
        row["goal_margin"] = {"perplexity": margin, "se": se}
        row["verdict"] = ("met" if row["goal_met"] else "not met" if not fits or margin < -2 * se else
                          "within noise")
        if args.calib_seeds > 1:
            row["calib_draws"] = calib_draws(args, model, out, t, name, budget, files[f"{t}/imatrix"], gguf,
                                             seed_importance, scorer, f32, f32_nll=math.log(base["perplexity"]))
        log(f"{t}: llama.cpp {row['llama_plain']['bytes']:,} B dppl {row['llama_plain']['delta_perplexity']:+.3f} "
            f"(imatrix {row['llama_imatrix']['delta_perplexity']:+.3f}); itera {row['itera']['bytes']:,} B "
            f"dppl {row['itera']['delta_perplexity']:+.3f} (se {row['itera']['delta_perplexity_se']:.3f}) -> "
            f"{row['verdict']}, margin {margin:+.3f} +- {se:.3f}")
        rows.append(row)
    result = {"bench": "frontier", "model": str(model), "text": args.text, "calib": args.calib, "planner": args.planner,
              "protocol": {"tokens": len(scorer.ids), "window": args.window, "stride": args.stride,
                           "scored": base["tokens"]},
              "f32": base, "points": rows, "goal_met_everywhere": all(r["goal_met"] for r in rows)}
    (out / "frontier.json").write_text(json.dumps(result, indent=2))
    draw(result, out / "frontier.png")
    result["png"] = str(out / "frontier.png")
    return result


def calib_draws(args, model: Path, out: Path, t: str, name: str, budget: int, imatrix_file: Path, itera_gguf: Path,
                seed_importance: dict, scorer: Scorer, f32: Path, f32_nll: float) -> dict:
    """The same point again from other calibration windows (seeds 1 .. --calib-seeds - 1): itera with
    the same plan (only GPTQ's Hessians change) and llama.cpp with that seed's importance data.
    A file's NLL change on other text is largely a first-order draw that moves with which windows
    calibrated it, far more than the windows' standard error says; the spread over draws shows it."""
    plan = out / f"itera-{name}" / "quant_plan.json"  # the plan the first draw applied
    draws: dict[str, list] = {"itera": [itera_gguf], "llama_imatrix": [imatrix_file]}
    for s in range(1, args.calib_seeds):
        g, _ = itera_file(model, out, f"{name}-seed{s}", args.calib, budget, plan, args.threads, seed=s)
        draws["itera"].append(g)
        draws["llama_imatrix"].append(llama_file(f32, out / f"llama-{t}-imatrix-seed{s}.gguf", t,
                                                 seed_importance[s], args.threads))
    result = {}
    for key, paths in draws.items():
        figs = [scorer.score(p) for p in paths]
        dnll, kl = [math.log(f["perplexity"]) - f32_nll for f in figs], [f["kl"] for f in figs]
        result[key] = {"delta_nll": dnll, "kl": kl, "delta_nll_mean": float(np.mean(dnll)),
                       "delta_nll_sd": float(np.std(dnll, ddof=1)), "kl_mean": float(np.mean(kl))}
        log(f"{t}: {key} over {len(paths)} calibration draws: NLL change {result[key]['delta_nll_mean']:+.5f} "
            f"sd {result[key]['delta_nll_sd']:.5f} nats/token, KL {result[key]['kl_mean']:.5f}")
    return result


def _count(types: dict) -> dict:
    out: dict[str, int] = {}
    for t in types.values():
        out[t] = out.get(t, 0) + 1
    return out


def draw(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for key, label, style in (("llama_plain", "llama.cpp", "o--"), ("llama_imatrix", "llama.cpp + importance", "s--"),
                              ("itera", "itera auto", "D-")):
        pts = sorted((r[key]["bytes"], r[key]["perplexity"]) for r in result["points"])
        ax.plot([b / 1e6 for b, _ in pts], [p for _, p in pts], style, label=label)
    ax.axhline(result["f32"]["perplexity"], color="gray", lw=0.8, label="F32")
    ax.set_xlabel("GGUF file size (MB)")
    ax.set_ylabel(f"perplexity (llama.cpp, {result['protocol']['scored']} held-out tokens)")
    ax.set_title(Path(result["model"]).name)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=str(ROOT / "runs" / "demo" / "teacher"),
                    help="float checkpoint, or 'large' (trained once, cached)")
    ap.add_argument("--text", default="pydocs@test", help="held-out text to score on")
    ap.add_argument("--calib", default="pydocs@train", help="calibration text (itera auto, importance data)")
    ap.add_argument("--types", default=",".join(LLAMA_TYPES))
    ap.add_argument("--tokens", type=int, default=8000)
    ap.add_argument("--window", type=int, default=512)
    ap.add_argument("--stride", type=int, default=256)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default=None)
    from itera.jobs.quantize import PLANNERS

    ap.add_argument("--planner", default=PLANNERS[0], choices=PLANNERS,
                    help="itera quantize --planner for the itera files (each planner's files are kept apart)")
    ap.add_argument("--calib-seeds", type=int, default=1,
                    help="also make each point from this many calibration draws in all (seeds 0..N-1) and "
                         "report the spread of the NLL change")
    args = ap.parse_args()
    if args.calib_seeds < 1:
        ap.error("--calib-seeds must be at least 1")
    args.types = [t.strip().upper() for t in args.types.split(",")]
    print(json.dumps(run(args), indent=2))


if __name__ == "__main__":
    main()
