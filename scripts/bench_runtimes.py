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

import numpy as np
import torch

from itera.data import load_text
from itera.evaluate import EvalOptions, evaluate_text
from itera.model.llama import KVCache
from itera.runtime import open_runtime


def decode_torch(rt, prompt, n):
    cache, ids = KVCache(), list(prompt)
    with torch.inference_mode():
        logits = rt.model(torch.tensor([ids]), cache=cache)
        t0 = time.perf_counter()
        for _ in range(n):
            nxt = int(logits[0, -1].argmax())
            logits = rt.model(torch.tensor([[nxt]]), cache=cache)
    return n / (time.perf_counter() - t0)


def decode_onnx(kv_file, cfg_layers, nkv, hd, prompt, n):
    import onnxruntime as ort

    s = ort.InferenceSession(str(kv_file), providers=["CPUExecutionProvider"])
    names = [o.name for o in s.get_outputs()][1:]
    past = {f"past_{k}_{i}": np.zeros((1, nkv, 0, hd), np.float32) for i in range(cfg_layers) for k in ("key", "value")}
    res = s.run(None, {"input_ids": np.asarray([prompt], np.int64), **past})
    t0 = time.perf_counter()
    for _ in range(n):
        nxt = int(res[0][0, -1].argmax())
        past = {k.replace("present", "past"): v for k, v in zip(names, res[1:])}
        res = s.run(None, {"input_ids": np.asarray([[nxt]], np.int64), **past})
    return n / (time.perf_counter() - t0)


def decode_llama(rt, prompt, n):
    llm = rt.llm
    llm.reset()
    llm.eval(list(prompt))
    t0 = time.perf_counter()
    for _ in range(n):
        nxt = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        llm.eval([nxt])
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
    cfg = runtimes["torch"].model.config
    prompt = runtimes["torch"].tokenizer.encode(text[:2000], add_bos=False)[:32]
    samples: dict[str, dict[str, list[float]]] = {n: {"eval_tokens_per_s": [], "decode_tokens_per_s": []} for n in arts}
    for _ in range(a.repeats):
        for name, rt in runtimes.items():
            samples[name]["eval_tokens_per_s"].append(evaluate_text(rt, text, opts)["tokens_per_s"])
            if name == "torch":
                d = decode_torch(rt, prompt, 64)
            elif name == "onnxruntime":
                d = decode_onnx(work / "m.kv.onnx", cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim, prompt, 64)
            else:
                d = decode_llama(rt, prompt, 64)
            samples[name]["decode_tokens_per_s"].append(d)
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
