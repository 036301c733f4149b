"""Throughput of one model in each runtime, measured side by side in one run.

For torch eager, onnxruntime and llama.cpp (F32, Q8_0, Q4_0 GGUF): perplexity-evaluation tokens/s
(windows of 256 tokens, stride 128, over a fixed text) and greedy decode tokens/s (a 32-token
prompt, then 64 new tokens with each runtime's KV cache), each the median of --repeats runs
taken in turn. Prints JSON.

    python scripts/bench_runtimes.py [--model runs/demo/teacher]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from itera.data import load_text
from itera.scoring import EvalOptions, evaluate_text
from itera.runtime import open_runtime


def decode_tokens_per_s(stepper, prompt, n):
    """Greedy decode speed: the prompt once (not timed), then ``n`` timed steps."""
    tok = stepper.prefill(prompt)
    t0 = time.perf_counter()
    for _ in range(n):
        tok = stepper.step(tok)
    return n / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=Path("runs/demo/teacher"))
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--eval-tokens", type=int, default=4000)
    a = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-runtimes-"))
    if not (a.model / "config.json").is_file():
        sys.exit(f"{a.model} is not a checkpoint; run `make demo` first or pass --model")
    arts = {"torch": a.model, "onnxruntime": work / "m.onnx"}
    for t in ("F32", "Q8_0", "Q4_0"):
        arts[f"llama.cpp-{t}"] = work / f"m-{t}.gguf"
    for name, path in arts.items():
        if name == "torch":
            continue
        fmt = ["--format", "onnx"] if path.suffix == ".onnx" else ["--format", "gguf", "--gguf-type", name.split("-")[1]]
        subprocess.run([sys.executable, "-m", "itera", "export", "--model", str(a.model), "--out", str(path), *fmt],
                       check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    text = load_text("pydocs@test").text
    opts = EvalOptions(window=256, stride=128, max_tokens=a.eval_tokens, bos=False)
    runtimes = {name: open_runtime(path, threads=torch.get_num_threads()) for name, path in arts.items()}
    steppers = {name: rt.stepper() for name, rt in runtimes.items()}
    prompt = runtimes["torch"].tokenizer.encode(text[:2000], add_bos=False)[:32]
    samples: dict[str, dict[str, list[float]]] = {n: {"eval_tokens_per_s": [], "decode_tokens_per_s": []} for n in arts}
    for _ in range(a.repeats):
        for name, rt in runtimes.items():
            samples[name]["eval_tokens_per_s"].append(evaluate_text(rt, text, opts)["tokens_per_s"])
            samples[name]["decode_tokens_per_s"].append(decode_tokens_per_s(steppers[name], prompt, 64))
    med = {n: {k: round(statistics.median(v), 1) for k, v in s.items()} for n, s in samples.items()}
    print(json.dumps({"benchmark": "runtimes", "model": str(a.model), "threads": torch.get_num_threads(),
                      "window": 256, "stride": 128, "eval_tokens": a.eval_tokens, "decode": {"prompt": 32, "new": 64},
                      "median": med,
                      "eval_ratio_to_torch": {n: round(m["eval_tokens_per_s"] / med["torch"]["eval_tokens_per_s"], 3)
                                              for n, m in med.items()},
                      "decode_ratio_to_torch": {n: round(m["decode_tokens_per_s"] / med["torch"]["decode_tokens_per_s"], 3)
                                                for n, m in med.items()},
                      "samples": samples}, indent=2))


if __name__ == "__main__":
    main()
