"""Time and memory of every step on checkpoints with real models' shapes (random weights).

    python scripts/bench_scale.py [--shapes smollm2-135m tinyllama-1.1b] [--work runs/bench/scale]

Builds float32 checkpoints with the shapes of SmolLM2-135M and TinyLlama-1.1B (config only, no
download; a byte-level BPE trained on the built-in corpus, the embedding table padded to the
model's vocabulary), then runs evaluate, quantize (rtn, gptq, auto at 4.5 bits per weight), export
(GGUF F16 and Q4_0, ONNX) and benchmark-power, each in its own process, and prints JSON: per step the wall time, the
step's peak RSS (os.wait4's rusage of that process) and peak RSS / checkpoint bytes
(docs/benchmarks.md quotes a run: GGUF export of the 1.1B shape peaks at 1.21x).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

SHAPES = {
    # HuggingFaceTB/SmolLM2-135M: 30 layers, hidden 576, 9 heads / 3 kv heads, FFN 1536, tied, 49,152 tokens
    "smollm2-135m": dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True,
                         max_position_embeddings=8192, rope_theta=100000.0),
    # TinyLlama/TinyLlama-1.1B: 22 layers, hidden 2048, 32 heads / 4 kv heads, FFN 5632, untied, 32,000 tokens
    "tinyllama-1.1b": dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                           num_attention_heads=32, num_key_value_heads=4, tie_word_embeddings=False,
                           max_position_embeddings=2048, rope_theta=10000.0),
}


def build(shape: str, out: Path) -> Path:
    """A random float32 checkpoint with ``shape``'s config at ``out`` (kept between runs)."""
    import torch

    from itera.data import load_text
    from itera.model.checkpoint import save_model
    from itera.model.config import ModelConfig
    from itera.model.llama import LlamaForCausalLM
    from itera.tokenizer import train_bpe

    if (out / "config.json").is_file():
        return out
    tok_dir = out.parent / f"{shape}-tokenizer"
    if not (tok_dir / "tokenizer.json").is_file():
        train_bpe([load_text("pydocs@train").text], vocab_size=8000).save(tok_dir)
    cfg = ModelConfig(**SHAPES[shape], bos_token_id=0, eos_token_id=1)
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    model.to_empty(device="cpu")
    model.init_weights(seed=0)
    from itera.model.llama import rope_inv_freq

    model.inv_freq = rope_inv_freq(cfg)
    save_model(model, out, tokenizer_from=tok_dir, dtype="float32", max_shard_bytes=2_000_000_000)
    return out


def step(name: str, argv: list[str], ckpt_bytes: int, log: Path) -> dict:
    """Run one itera command in its own process; its wall time and its own peak RSS.

    Linux carries a process's peak RSS across fork and exec, so a child's ``ru_maxrss`` is never
    below this process's peak when it was started: this process stays small (it never imports
    torch; checkpoints are built in a child of their own) and reports its own peak beside the steps."""
    t0 = time.perf_counter()
    with open(log, "ab") as err:
        err.write(f"\n== {name}: itera {' '.join(argv)}\n".encode())
        err.flush()
        p = subprocess.Popen([sys.executable, "-m", "itera", *argv], stdout=subprocess.PIPE, stderr=err)
        out = p.stdout.read()
        _, status, usage = os.wait4(p.pid, 0)
    wall = time.perf_counter() - t0
    rss = usage.ru_maxrss * 1024
    row = {"step": name, "ok": os.waitstatus_to_exitcode(status) == 0, "wall_s": round(wall, 1),
           "peak_rss_bytes": rss, "peak_rss_over_checkpoint": round(rss / ckpt_bytes, 3)}
    if row["ok"]:
        metrics = json.loads(out.decode().splitlines()[-1])["metrics"]
        row["figures"] = {k: metrics[k] for k in ("verified", "max_abs_logit_diff", "kl_to_source", "bits_per_weight",
                                                   "gguf_bits_per_weight", "perplexity_after", "decode_tokens_per_s",
                                                   "stage_seconds") if k in metrics}
        if metrics.get("runtime_vs_file"):
            row["figures"]["runtime_vs_file_rel_rms"] = metrics["runtime_vs_file"]["rel_rms"]
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    ap.add_argument("--work", type=Path, default=Path("runs/bench/scale"))
    ap.add_argument("--skip", nargs="*", default=[], help="Step names to leave out.")
    ap.add_argument("--build-only", action="store_true", help=argparse.SUPPRESS)  # the child that builds
    a = ap.parse_args()
    a.work.mkdir(parents=True, exist_ok=True)
    if a.build_only:
        for shape in a.shapes:
            build(shape, a.work / shape)
        return
    import resource

    results = {}
    for shape in a.shapes:
        ckpt = a.work / shape
        subprocess.run([sys.executable, __file__, "--build-only", "--shapes", shape, "--work", str(a.work)],
                       check=True)
        size = sum(f.stat().st_size for f in ckpt.glob("*.safetensors"))
        w = a.work / f"{shape}-out"
        w.mkdir(exist_ok=True)
        log = a.work / f"{shape}.log"
        steps = {
            "evaluate": ["evaluate", "--model", ckpt, "-d", "pydocs@test", "--max-tokens", "2048"],
            "quantize-rtn": ["quantize", "--model", ckpt, "--method", "rtn", "--bits", "4", "--group-size", "32",
                             "--out", w / "rtn", "--force"],
            "quantize-gptq": ["quantize", "--model", ckpt, "--method", "gptq", "--bits", "4", "--group-size", "32",
                              "--calib", "pydocs@test", "--calib-samples", "8", "--calib-seqlen", "256",
                              "--eval-tokens", "1024", "--out", w / "gptq", "--force"],
            # the byte-budget planner (--planner predicted, the default) and GPTQ applying its plan
            "quantize-auto": ["quantize", "--model", ckpt, "--method", "auto", "--target-bpw", "4.5",
                              "--calib", "pydocs@test", "--eval-tokens", "1024", "--out", w / "auto", "--force"],
            "export-gguf-f16": ["export", "--model", ckpt, "--format", "gguf", "--gguf-type", "F16",
                                "--out", w / "m-f16.gguf", "--force"],
            # Random weights give nearly flat logits, so a block type's runtime-vs-file difference,
            # relative to the logits' spread, sits near its limit (0.048 for the 1.1B shape against
            # 0.002 on a trained model): the file is kept, and its figures say verified or not.
            "export-gguf-q4_0": ["export", "--model", ckpt, "--format", "gguf", "--gguf-type", "Q4_0",
                                 "--out", w / "m-q4_0.gguf", "--force", "--allow-mismatch"],
            "export-onnx": ["export", "--model", ckpt, "--format", "onnx", "--out", w / "m.onnx", "--force"],
            "benchmark-power": ["benchmark-power", "--model", w / "m-q4_0.gguf", "--runs", "3",
                                "--prompt-tokens", "32", "--gen-tokens", "32"],
        }
        rows = []
        for name, argv in steps.items():
            if name in a.skip:
                continue
            rows.append(step(name, [str(x) for x in argv], size, log))
            print(json.dumps({"shape": shape, **rows[-1]}), file=sys.stderr, flush=True)
        results[shape] = {"checkpoint_bytes": size, "config": SHAPES[shape], "steps": rows}
    harness = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"benchmark": "scale", "cpus": os.cpu_count(), "harness_peak_rss_bytes": harness,
                      "results": results}, indent=2))


if __name__ == "__main__":
    main()
