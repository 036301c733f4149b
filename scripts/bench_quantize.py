"""Size, perplexity and wall time of quantization methods on one model and one text.

    python scripts/bench_quantize.py [--model runs/demo/teacher] [--calib pydocs@test]

Without --model (and without runs/demo/teacher) it first trains a small model on pydocs@train.
Prints one JSON object: for float, int8 RTN, 4-bit RTN, 4-bit GPTQ and auto at 4.5 bits per
weight: bytes on disk, bits per weight, held-out perplexity and quantization seconds.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from itera.jobs.quantize import QuantizeOptions, run_quantize


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=Path("runs/demo/teacher"))
    ap.add_argument("--calib", default="pydocs@test")
    ap.add_argument("--group-size", type=int, default=32)
    ap.add_argument("--eval-tokens", type=int, default=8000)
    a = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-quantize-"))
    if not (a.model / "config.json").is_file():
        a.model = work / "model"
        subprocess.run([sys.executable, "-m", "itera", "distill", "--alpha", "0", "--tokenizer", "bpe:1024",
                        "--layers", "4", "--hidden", "128", "--heads", "4", "--kv-heads", "2", "--ffn", "384",
                        "--data", "pydocs@train", "--out", str(a.model), "--steps", "300", "--batch-size", "16",
                        "--seq-len", "64", "--lr", "4e-3"], check=True, stdout=subprocess.DEVNULL)
    g = a.group_size
    cases = {
        "int8-rtn": dict(method="rtn", bits=8),
        f"4bit-rtn-g{g}": dict(method="rtn", bits=4, group_size=g),
        f"4bit-gptq-g{g}": dict(method="gptq", bits=4, group_size=g),
        "4bit-gptq-Q4_K": dict(method="gptq", gguf_type="Q4_K"),
        "auto-4.5bpw": dict(method="auto", target_bpw=4.5),  # over every tensor of the GGUF file
    }
    results = {}
    for name, kw in cases.items():
        opts = QuantizeOptions(model=a.model, out=work / name, calib=a.calib, calib_samples=128, calib_seqlen=128,
                               eval_tokens=a.eval_tokens, **kw)
        m = run_quantize(opts).metrics
        results.setdefault("float", {"bytes": m["source_bytes"], "bits_per_weight": None,
                                     "perplexity": m["perplexity_before"], "quantize_seconds": 0.0})
        results[name] = {"bytes": m["quantized_bytes"], "bits_per_weight": round(m["bits_per_weight"], 4),
                         "gguf_bytes": m.get("gguf_bytes"),
                         "perplexity": m["perplexity_after"], "quantize_seconds": round(m["quantize_seconds"], 2)}
    base = results["float"]["perplexity"]
    for r in results.values():
        r["perplexity_vs_float"] = round(r["perplexity"] / base - 1, 5)
    print(json.dumps({"benchmark": "quantize", "model": str(a.model), "calib": a.calib,
                      "eval_tokens": a.eval_tokens, "results": results}, indent=2))


if __name__ == "__main__":
    main()
