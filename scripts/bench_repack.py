"""llama.cpp's decode and prompt speed with repacked weights (its CPU "extra buffer types", what
itera's probe turns off where they crash) and without, side by side.

A random Llama checkpoint (hidden 1024, 8 layers, FFN 2816, vocabulary ~2k: 76M parameters) is
written as GGUF Q4_0, Q8_0 and Q4_K_M by itera's exporter. Each round loads every file in both modes,
each load in a fresh child process (so a crash in one mode is a result, not the end of the bench),
in alternating order, and times a 256-token prompt (one batch) and 64 greedy single-token steps.

    python scripts/bench_repack.py [--rounds 5] [--threads 2]

Prints one JSON object: for each type and mode, the median tokens/s with its interquartile range
and every sample; and the repacked/plain ratio of medians for prompt and decode.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

TYPES = ("Q4_0", "Q8_0", "Q4_K_M")
SHAPE = dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=8, num_attention_heads=16,
             num_key_value_heads=4, max_position_embeddings=512)


def build(d: str) -> dict[str, str]:
    """Child: the checkpoint and its GGUF files."""
    import torch

    from itera.model.checkpoint import save_model
    from itera.model.config import ModelConfig
    from itera.model.llama import LlamaForCausalLM
    from itera import probe
    from itera.tokenizer import train_bpe

    from itera.data import load_text

    tok = train_bpe([load_text("pydocs@train").text[:300_000]], vocab_size=2048)
    tok.save(Path(d) / "tok")
    torch.manual_seed(0)
    model = LlamaForCausalLM(ModelConfig(vocab_size=tok.vocab_size, bos_token_id=tok.bos_id,
                                         eos_token_id=tok.eos_id, **SHAPE))
    model.init_weights(seed=0, std=0.02)
    save_model(model, Path(d) / "ckpt", tokenizer_from=Path(d) / "tok")
    return {t: str(probe.tiny_gguf(Path(d), t)) for t in TYPES}


def measure(path: str, repack: bool, threads: int, prompt: int = 256, steps: int = 64) -> dict:
    """Child: load in one mode, time one prompt batch and ``steps`` single-token decodes."""
    import contextlib
    import io

    import llama_cpp

    from itera.runtime.llamacpp_mode import model_params

    with contextlib.redirect_stderr(io.StringIO()), model_params(repack):
        llm = llama_cpp.Llama(path, n_ctx=512, n_batch=512, n_ubatch=512, verbose=False, n_threads=threads,
                              n_threads_batch=threads)
    ids = [(i * 7919) % (llm.n_vocab() - 3) + 3 for i in range(prompt)]
    llm.eval(ids[:8])  # warm the kernels and buffers
    llm.reset()
    t0 = time.perf_counter()
    llm.eval(ids)
    t1 = time.perf_counter()
    for i in range(steps):
        llm.eval([ids[i]])
    t2 = time.perf_counter()
    llm.close()
    return {"prompt_tokens_per_s": prompt / (t1 - t0), "decode_tokens_per_s": steps / (t2 - t1)}


def _stats(xs: list[float]) -> dict:
    q = statistics.quantiles(xs, n=4) if len(xs) >= 2 else [xs[0]] * 3
    return {"median": round(statistics.median(xs), 1), "iqr": round(q[2] - q[0], 1),
            "samples": [round(x, 1) for x in xs]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    import os

    here = str(Path(__file__).resolve().parent)  # the children import this script as a module
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [here, os.environ.get("PYTHONPATH")]))
    from itera.runtime.isolate import NativeCrash, call

    with tempfile.TemporaryDirectory(prefix="bench-repack-") as d:
        files = call("bench_repack:build", d, runtime="torch", what="building the checkpoint")
        samples = {t: {m: {"prompt": [], "decode": []} for m in ("repacked", "plain")} for t in TYPES}
        crashes: dict[str, str] = {}
        for r in range(args.rounds):
            for t in TYPES:
                modes = ("repacked", "plain") if r % 2 == 0 else ("plain", "repacked")
                for m in modes:
                    try:
                        got = call("bench_repack:measure", files[t], m == "repacked", args.threads,
                                   runtime="llama.cpp", what=f"timing {t} ({m})")
                    except NativeCrash as e:
                        crashes[f"{t} {m}"] = str(e)
                        continue
                    samples[t][m]["prompt"].append(got["prompt_tokens_per_s"])
                    samples[t][m]["decode"].append(got["decode_tokens_per_s"])
                print(f"round {r + 1}/{args.rounds}: {t} done", file=sys.stderr)
    out = {"benchmark": "repack", "rounds": args.rounds, "threads": args.threads, "shape": SHAPE, "types": {},
           "crashes": crashes}
    for t in TYPES:
        row = {m: {k: _stats(v) for k, v in samples[t][m].items() if v} for m in samples[t]}
        if all(samples[t][m]["prompt"] for m in samples[t]):
            row["repacked_over_plain"] = {
                k: round(statistics.median(samples[t]["repacked"][k]) / statistics.median(samples[t]["plain"][k]), 3)
                for k in ("prompt", "decode")}
        out["types"][t] = row
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
