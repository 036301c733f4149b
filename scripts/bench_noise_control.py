"""How much of a llama.cpp file's perplexity change random noise of the same size gets.

A control for ``bench_frontier.py``: for each --types point (by default the points where the
bench's goal was not met) it takes the better llama.cpp file
there (from the bench's frontier.json), measures that file's weight error against the F32 export
tensor by tensor (root mean square of dequantized minus F32), and writes copies of the F32 file
with Gaussian noise of exactly that size added to each tensor, one per seed. llama.cpp scores the
F32 file, the llama.cpp file and the noisy copies on the same windows of held-out text as the
bench (same protocol, same scorer): perplexity change with its paired standard error, and mean
KL(F32 || file).

If noise of the file's size changes held-out perplexity by about as much as the file does, the
file's perplexity change says how large its error is, not that its rounding is good; the spread
over seeds is what luck alone moves it by.

    python scripts/bench_noise_control.py --types Q5_K_M --seeds 5 --tokens 40000 --threads 2
    python scripts/bench_noise_control.py --model large --types Q4_0 --seeds 5 --tokens 40000 --threads 2

Reads the files bench_frontier.py left under its --out (run it first); writes control.json there.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_frontier import LARGE, ROOT, Scorer, log  # noqa: E402


def error_rms(f32: Path, quantized: Path) -> dict[str, float]:
    """Root mean square of (dequantized - F32), per tensor, in the GGUF's own layout."""
    import gguf

    ref = {t.name: t for t in gguf.GGUFReader(str(f32)).tensors}
    out = {}
    for t in gguf.GGUFReader(str(quantized)).tensors:
        w = np.asarray(ref[t.name].data, dtype=np.float32)
        q = np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32).reshape(w.shape)
        out[t.name] = float(np.sqrt(np.mean((q.astype(np.float64) - w) ** 2)))
    return out


def noisy_copy(f32: Path, rms: dict[str, float], seed: int, dst: Path) -> Path:
    """``f32`` with N(0, rms[name]^2) added to every tensor (float32 throughout, so llama.cpp adds
    no rounding of its own)."""
    import gguf

    tmp = dst.with_name(dst.name + ".tmp")
    shutil.copyfile(f32, tmp)
    rng = np.random.default_rng(seed)
    r = gguf.GGUFReader(str(tmp), "r+")
    for t in r.tensors:
        if rms.get(t.name, 0.0) > 0:
            t.data[...] += (rms[t.name] * rng.standard_normal(t.data.shape)).astype(np.float32)
    r.data.flush()
    del r
    os.replace(tmp, dst)
    return dst


def run(args) -> dict:
    from itera.data import load_text
    from itera.tokenizer import Tokenizer

    model = LARGE / "teacher" if args.model == "large" else Path(args.model)
    out = Path(args.out or (LARGE if args.model == "large" else
                            ROOT / "runs" / "bench" / f"frontier-{model.parent.name}-{model.name}"))
    bench = json.loads((out / "frontier.json").read_text()) if (out / "frontier.json").is_file() else None
    if bench is None:
        sys.exit(f"no {out / 'frontier.json'}: run scripts/bench_frontier.py with the same --model first")
    f32 = out / "f32.gguf"
    types = args.types or [r["type"] for r in bench["points"] if r["verdict"] != "met"]
    scorer = Scorer(Tokenizer.from_dir(model), load_text(args.text, purpose="eval").text, args.tokens,
                    args.window, args.stride, args.threads)
    base = scorer.score(f32)
    log(f"F32: perplexity {base['perplexity']:.3f}")

    def scored(path: Path) -> dict:
        s = scorer.score(path)
        _, se = scorer.delta({path: s["perplexity"], f32: -base["perplexity"]})
        return {"delta_perplexity": s["perplexity"] - base["perplexity"], "delta_perplexity_se": se, "kl": s["kl"]}

    points = []
    for t in types:
        row = next(r for r in bench["points"] if r["type"] == t)
        tag = min(("plain", "imatrix"), key=lambda k: row[f"llama_{k}"]["delta_perplexity"])
        llama = out / f"llama-{t}-{tag}.gguf"
        rms = error_rms(f32, llama)
        point = {"type": t, "llama_file": llama.name, "llama": scored(llama),
                 "itera_in_bench": {k: row["itera"][k] for k in ("delta_perplexity", "delta_perplexity_se", "kl")},
                 "goal": 0.5 * row[f"llama_{tag}"]["delta_perplexity"], "noise": []}
        for seed in range(args.seeds):
            path = noisy_copy(f32, rms, seed, out / f"noise-{t}-{tag}-seed{seed}.gguf")
            point["noise"].append({"seed": seed, **scored(path)})
            path.unlink()  # a copy of F32 each: rewritten in seconds from the seed
            log(f"{t}: noise seed {seed}: dppl {point['noise'][-1]['delta_perplexity']:+.3f}, "
                f"KL {point['noise'][-1]['kl']:.5f}")
        d = np.array([n["delta_perplexity"] for n in point["noise"]])
        point["noise_delta_perplexity"] = {"mean": float(d.mean()), "min": float(d.min()), "max": float(d.max())}
        log(f"{t}: {llama.name} dppl {point['llama']['delta_perplexity']:+.3f} KL {point['llama']['kl']:.5f}; "
            f"noise of its size dppl {d.mean():+.3f} [{d.min():+.3f}, {d.max():+.3f}]")
        points.append(point)
    result = {"bench": "noise_control", "model": str(model), "text": args.text,
              "protocol": bench["protocol"] | {"tokens": len(scorer.ids)}, "f32": base, "points": points}
    (out / "control.json").write_text(json.dumps(result, indent=2))
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=str(ROOT / "runs" / "demo" / "teacher"),
                    help="the float checkpoint bench_frontier.py ran on, or 'large'")
    ap.add_argument("--text", default="pydocs@test")
    ap.add_argument("--types", default="", help="llama.cpp types (default: where the bench's goal was not met)")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=40000)
    ap.add_argument("--window", type=int, default=512)
    ap.add_argument("--stride", type=int, default=256)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default=None, help="bench_frontier.py's --out")
    args = ap.parse_args()
    args.types = [t.strip().upper() for t in args.types.split(",") if t.strip()]
    print(json.dumps(run(args), indent=2))


if __name__ == "__main__":
    main()
