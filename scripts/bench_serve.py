"""`itera serve` under load, on this machine, over loopback only: latency, time to first token,
tokens/s and errors, the server's overhead against llama-cpp-python's own generation loop, and
that overload is answered with 429 (no 5xx) while no acknowledged feedback row is lost.

    python scripts/bench_serve.py [--model runs/demo/teacher-f16.gguf] [--requests 24] [--max-tokens 64]
        [--overload-concurrency 8] [--max-concurrency 2] [--max-queue 2] [--repeats 3] [--threads 1]

1. starts ``python -m itera serve`` on 127.0.0.1 (a free port) with its own feedback store;
2. ``--repeats`` times, interleaved: the same ``--requests`` prompts, one at a time and greedily,
   (a) through llama-cpp-python's own ``Llama.generate`` in this process, (b) through itera's
   runtime layer in this process (the server's stepper and ``Generation``, no HTTP), (c) streamed
   through the server — same file, thread count and token budget; tokens/s of each and the ratios
   (server / bare is the overhead; the in-process figure splits it into runtime and HTTP);
3. ``--requests`` requests from ``--overload-concurrency`` clients at once against
   ``--max-concurrency``/``--max-queue``: status counts (429s expected, 5xx not), and a thumbs
   feedback posted for every answered request;
4. SIGTERM (graceful), then the store is opened: integrity check and every acknowledged
   feedback id present.

Every request has a timeout and the whole run a deadline (``--deadline``). Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

PROMPTS = ["Return the value of the attribute", "Create a new dictionary with keys from", "Raise an exception if the",
           "The default value is", "Read the contents of the file and", "Convert the string to",
           "This function is deprecated since", "Return True if the object is"]


def pct(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    k = (len(xs) - 1) * q / 100
    lo, hi = int(k), min(int(k) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def summary(xs: list[float]) -> dict:
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs), "runs": xs} if xs else {}


class Server:
    def __init__(self, model: Path, store: Path, args):
        cmd = [sys.executable, "-m", "itera", "serve", "--model", str(model), "--host", "127.0.0.1", "--port", "0",
               "--feedback-db", str(store), "--max-concurrency", str(args.max_concurrency),
               "--max-queue", str(args.max_queue), "--threads", str(args.threads)]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.err: list[str] = []
        threading.Thread(target=lambda: self.err.extend(iter(self.proc.stderr.readline, "")), daemon=True).start()
        t0 = time.monotonic()
        while time.monotonic() - t0 < 300:
            m = next((re.search(r" on (http://127\.0\.0\.1:\d+);", line) for line in list(self.err)
                      if " on http://" in line), None)
            if m:
                self.url = m.group(1)
                return
            if self.proc.poll() is not None:
                raise SystemExit(f"itera serve exited: {''.join(self.err)[-2000:]}")
            time.sleep(0.05)
        self.proc.kill()
        raise SystemExit("itera serve did not start within 300 s")

    def stop(self) -> dict | None:
        self.proc.send_signal(signal.SIGTERM)
        out = self.proc.stdout.read()
        self.proc.wait(timeout=120)
        lines = [line for line in out.splitlines() if line.startswith("{")]
        return json.loads(lines[-1]) if lines else None


def one_request(client: httpx.Client, prompt: str, max_tokens: int) -> dict:
    """A streamed greedy completion: status, latency, time to first token, tokens, id."""
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    out = {"status": None, "latency_s": None, "ttft_s": None, "tokens": 0, "id": None}
    try:
        with client.stream("POST", "/v1/completions", json=body) as r:
            out["status"] = r.status_code
            if r.status_code != 200:
                r.read()
                return out
            for line in r.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                ev = json.loads(line[6:])
                out["id"] = ev.get("id", out["id"])
                if out["ttft_s"] is None and ev.get("choices") and ev["choices"][0].get("text"):
                    out["ttft_s"] = time.perf_counter() - t0
                if ev.get("usage"):
                    out["tokens"] = ev["usage"]["completion_tokens"]
        out["latency_s"] = time.perf_counter() - t0
    except httpx.HTTPError as e:
        out["status"] = f"{type(e).__name__}"
    return out


def scenario(url: str, prompts: list[str], max_tokens: int, concurrency: int, feedback: bool) -> dict:
    results: list[dict] = []
    acked: list[int] = []
    lock = threading.Lock()
    work = list(enumerate(prompts))

    def worker():
        with httpx.Client(base_url=url, timeout=120) as client:
            while True:
                with lock:
                    if not work:
                        return
                    _, prompt = work.pop(0)
                r = one_request(client, prompt, max_tokens)
                if feedback and r["status"] == 200:
                    f = client.post("/v1/feedback", json={"type": "thumbs", "response_id": r["id"], "vote": "up"})
                    r["feedback"] = f.status_code
                    if f.status_code == 201:
                        acked.append(f.json()["id"])
                results.append(r)

    t0 = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        for _ in range(concurrency):
            pool.submit(worker)
    wall = time.perf_counter() - t0
    ok = [r for r in results if r["status"] == 200]
    lat = [r["latency_s"] * 1e3 for r in ok]
    ttft = [r["ttft_s"] * 1e3 for r in ok if r["ttft_s"] is not None]
    status: dict[str, int] = {}
    for r in results:
        status[str(r["status"])] = status.get(str(r["status"]), 0) + 1
    tokens = sum(r["tokens"] for r in ok)
    return {
        "concurrency": concurrency, "requests": len(results), "status": status,
        "errors": len(results) - len(ok),
        "server_errors": sum(n for s, n in status.items() if s.isdigit() and int(s) >= 500),
        "transport_errors": sum(n for s, n in status.items() if not s.isdigit()),
        "latency_ms": {f"p{q}": pct(lat, q) for q in (50, 95, 99)},
        "ttft_ms": {f"p{q}": pct(ttft, q) for q in (50, 95, 99)},
        "completion_tokens": tokens, "wall_s": wall, "tokens_per_s": tokens / wall if wall else None,
        "feedback": {"posted": sum(1 for r in ok if "feedback" in r), "acknowledged": len(acked)} if feedback else None,
        "_acked": acked,
    }


def bare_llama_cpp(model: Path, prompts: list[str], max_tokens: int, threads: int) -> dict:
    """llama-cpp-python's own loop: tokenize, Llama.generate greedily (top_k 1), stop at EOS or the budget."""
    import llama_cpp

    llm = llama_cpp.Llama(str(model), n_ctx=0, n_threads=threads, n_threads_batch=threads, verbose=False)
    try:
        tokens, t0 = 0, time.perf_counter()
        for p in prompts:
            ids = llm.tokenize(p.encode(), add_bos=True)
            n = 0
            for tok in llm.generate(ids, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, reset=True):
                if llm.token_eos() == tok:
                    break
                n += 1
                if n >= max_tokens:
                    break
            tokens += n
        wall = time.perf_counter() - t0
    finally:
        llm.close()
    return {"completion_tokens": tokens, "wall_s": wall, "tokens_per_s": tokens / wall}


def itera_in_process(model: Path, prompts: list[str], max_tokens: int, threads: int) -> dict:
    """The server's decoding without the server: the llama.cpp runtime and its stepper, sampling's
    Generation at temperature 0, the same lane thread limits."""
    from itera.runtime.llamacpp_backend import LlamaCppRuntime
    from itera.runtime.sampling import Generation, SamplingParams

    with LlamaCppRuntime(model, threads=threads) as rt:  # prompts and single tokens on `threads`
        stepper, tok = rt.stepper(), rt.tokenizer
        tokens, t0 = 0, time.perf_counter()
        for p in prompts:
            g = Generation(stepper, tok.decode, tok.encode(p), SamplingParams(max_tokens=max_tokens, temperature=0.0),
                           frozenset({tok.eos_id}) - {None})
            for _ in g:
                pass
            tokens += len(g.tokens)
        wall = time.perf_counter() - t0
    return {"completion_tokens": tokens, "wall_s": wall, "tokens_per_s": tokens / wall}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=Path("runs/demo/teacher-f16.gguf"))
    ap.add_argument("--requests", type=int, default=24)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--overload-concurrency", type=int, default=8)
    ap.add_argument("--max-concurrency", type=int, default=2)
    ap.add_argument("--max-queue", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1, help="CPU threads per generation, server and bare loop alike")
    ap.add_argument("--deadline", type=float, default=900, help="seconds for the whole run")
    args = ap.parse_args()
    if not args.model.is_file():
        raise SystemExit(f"{args.model} does not exist; run `make demo` first or pass --model FILE.gguf")
    if not 1 <= args.requests <= 1000:
        raise SystemExit("--requests must be between 1 and 1000")
    timer = threading.Timer(args.deadline, lambda: os.kill(os.getpid(), signal.SIGTERM))
    timer.daemon = True
    timer.start()
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(args.requests)]
    with tempfile.TemporaryDirectory(prefix="bench-serve-") as tmp:
        store = Path(tmp) / "feedback.db"
        server = Server(args.model, store, args)
        try:
            scenario(server.url, prompts[:2], args.max_tokens, 1, feedback=False)  # warm-up
            served, bare, inproc, runs = [], [], [], []
            for _ in range(args.repeats):
                bare.append(bare_llama_cpp(args.model, prompts, args.max_tokens, args.threads)["tokens_per_s"])
                inproc.append(itera_in_process(args.model, prompts, args.max_tokens, args.threads)["tokens_per_s"])
                s = scenario(server.url, prompts, args.max_tokens, 1, feedback=False)
                served.append(s["tokens_per_s"])
                runs.append(s)
            over = scenario(server.url, prompts, args.max_tokens, args.overload_concurrency, feedback=True)
        finally:
            record = server.stop()
        acked = over.pop("_acked")
        for r in runs:
            r.pop("_acked")
        con = sqlite3.connect(store)
        integrity = con.execute("PRAGMA integrity_check").fetchone()[0]
        rows = {r[0] for r in con.execute("SELECT id FROM feedback")}
        con.close()
    sequential = runs[len(runs) // 2]
    print(json.dumps({
        "benchmark": "serve", "model": str(args.model), "max_tokens": args.max_tokens, "requests": args.requests,
        "threads": args.threads, "max_concurrency": args.max_concurrency, "max_queue": args.max_queue,
        "sequential": {**sequential, "tokens_per_s_runs": summary(served)},
        "bare_llama_cpp": {"tokens_per_s_runs": summary(bare),
                           "loop": "Llama.generate(top_k=1, temp=0), llama.cpp's default KV cache and logits"},
        "itera_in_process": {"tokens_per_s_runs": summary(inproc),
                             "loop": "itera's llama.cpp runtime (F32 KV cache, all logits) + sampling.Generation"},
        "overhead_ratio": statistics.median(served) / statistics.median(bare),
        "runtime_ratio": statistics.median(inproc) / statistics.median(bare),
        "http_ratio": statistics.median(served) / statistics.median(inproc),
        "overload": over,
        "feedback_store": {"acknowledged": len(acked), "rows": len(rows), "lost": len(set(acked) - rows),
                           "integrity": integrity},
        "server_record": record["metrics"] if record else None,
    }, indent=2))


if __name__ == "__main__":
    main()
