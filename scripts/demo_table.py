"""The demo's figures, from the demo's own records: what docs/commands.md quotes under "The demo".

    python scripts/demo_table.py runs/demo                          # print the block
    python scripts/demo_table.py runs/demo --check docs/commands.md  # exit 1 where the docs' figures drift
    python scripts/demo_table.py runs/demo --write docs/commands.md  # replace the docs' block with this run's

The block sits between ``<!-- demo-figures:begin -->`` and ``<!-- demo-figures:end -->``. ``--check``
compares what a run on the same machine and code repeats (parameters, sizes, perplexities, the
gate's verdict): CPU runs with the same kernels are deterministic. It ignores what never repeats
(wall time, tokens/s, whether the machine was busy). Another CPU (AVX-512 against AVX2, another
torch or llama.cpp build) sums floats in another order, so its perplexities can differ in the
last digits and its timings entirely; `make demo` says so instead of failing.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

BEGIN, END = "<!-- demo-figures:begin -->", "<!-- demo-figures:end -->"
DATASET = "pydocs@test"
HEADER = ("| artifact | size | perplexity on `pydocs@test` | decode tokens/s in llama.cpp: per step, median (IQR) "
          "/ over wall time |")
REPEATED_COLUMNS = 3  # artifact, size, perplexity: what --check compares


class DemoError(Exception):
    pass


def load(runs: Path, name: str) -> dict:
    path = runs / name
    try:
        text = path.read_text("utf-8").strip()
    except OSError as e:
        raise DemoError(f"{path}: {e.strerror}; run `make demo` first") from None
    if not text:
        raise DemoError(f"{path} is empty; run `make demo` again")
    return json.loads(text)


def human_bytes(n: int) -> str:
    if n >= 1 << 20:
        return f"{n / (1 << 20):.1f} MiB"
    return f"{n / 1024:.0f} KiB"


def perplexity(rec: dict) -> float:
    return rec["metrics"]["datasets"][DATASET]["perplexity"]


def bench_of(power: dict, artifact: dict) -> dict:
    """The benchmark result of one artifact in the ``--compare`` record: keyed by its file name and
    sha256 (``a.gguf#9e1c04d2``, the sha256 inside), or by its path in older records."""
    for key, result in (power["metrics"].get("compare") or {}).items():
        if result.get("sha256") == artifact.get("sha256") or \
                ("sha256" not in result and Path(key).name == Path(artifact["path"]).name):
            return result
    raise DemoError(f"compare-power.json has no result for {artifact['path']}")


def rate(result: dict) -> str:
    step, iqr, wall = (result.get(k) for k in ("decode_tokens_per_s", "decode_tokens_per_s_iqr",
                                                "decode_tokens_per_s_wall"))
    text = f"{step:,.0f}" + (f" (IQR {iqr:,.0f})" if iqr is not None else "")
    return text + (f" / {wall:,.0f}" if wall is not None else "")


def busy(results: list[dict]) -> str:
    """Why a benchmark is unstable, in one clause: how busy the machine was."""
    waits = [r["cpu_wait_fraction"] for r in results if r.get("cpu_wait_fraction") is not None]
    load = max((r.get("loadavg_start") or 0, r.get("loadavg_end") or 0) for r in results)
    cores = results[0].get("usable_cores")
    parts = []
    if waits:
        parts.append("llama.cpp's threads waited for a CPU " + " and ".join(f"{100 * w:.0f}%" for w in waits)
                     + " of their runnable time")
    if max(load):
        parts.append(f"load average up to {max(load):.1f} on {cores} usable cores")
    return "; ".join(parts) or "see the record's stability_reason"


def refusal(history: dict) -> str | None:
    """The promotion gate's reason, as ``registry history`` (runs/demo/history.json) logged it."""
    for event in history.get("events") or []:
        if event.get("event") == "promote-refused":
            return (event.get("detail") or {}).get("reason")
    return None


def figures(runs: Path) -> dict:
    """Everything the block says, read from the records under ``runs``."""
    teacher, student = load(runs, "teacher.json"), load(runs, "student.json")
    evals = {k: load(runs, f"{k}-eval.json") for k in ("teacher", "teacher-f16", "student", "student-q4",
                                                         "student-q4-gguf")}
    power, history = load(runs, "compare-power.json"), load(runs, "history.json")
    all_records = [teacher, student, power, *evals.values()]  # history.json is the registry's, not a record
    t_f16, s_q4 = bench_of(power, evals["teacher-f16"]["artifact"]), bench_of(power, evals["student-q4-gguf"]["artifact"])
    rows = [
        (f"teacher, float ({teacher['metrics']['student_params']:,} parameters, "
         f"{teacher['params']['train']['steps']} steps)", evals["teacher"], None),
        ("teacher, GGUF F16", evals["teacher-f16"], t_f16),
        (f"student, float ({student['metrics']['student_params']:,} parameters; "
         f"{student['metrics']['init_student_perplexity']:.1f} on its own held-out text right after pruning)",
         evals["student"], None),
        ("student, GPTQ 4-bit g32", evals["student-q4"], None),
        ("student, GGUF Q4_0", evals["student-q4-gguf"], s_q4),
    ]
    start = min(r["started_at"] for r in all_records)
    ends = [r for r in all_records if r.get("duration_s") is not None]
    return {"rows": [(name, human_bytes(rec["artifact"]["bytes"]), f"{perplexity(rec):.2f}",
                      rate(bench) if bench else "") for name, rec, bench in rows],
            "host": teacher.get("host") or {},
            "start": start,
            "records_seconds": sum(r["duration_s"] for r in ends),
            "smaller": evals["teacher-f16"]["artifact"]["bytes"] / evals["student-q4-gguf"]["artifact"]["bytes"],
            "worse": perplexity(evals["student-q4-gguf"]) / perplexity(evals["teacher-f16"]) - 1,
            "speed": (s_q4["decode_tokens_per_s"] / t_f16["decode_tokens_per_s"]) if power["metrics"]["stable"] else None,
            "unstable": None if power["metrics"]["stable"] else busy([t_f16, s_q4]),
            "energy": power["metrics"].get("energy_method"),
            "energy_reason": power["metrics"].get("energy_reason"),
            "refusal": refusal(history)}


def render(f: dict) -> str:
    host = f["host"]
    lines = [BEGIN,
             f"One run of `make demo` ({host.get('cpu') or 'CPU unknown'}, {host.get('usable_cores', '?')} cores, "
             f"{f['records_seconds'] / 60:.0f} minutes in itera's commands; `python scripts/demo_table.py "
             f"runs/demo` printed this block from its records):", "",
             HEADER, "| --- | --- | --- | --- |"]
    lines += [f"| {' | '.join(row)} |" for row in f["rows"]]
    lines.append("")
    lines.append(f"The gate refused the student: \"{f['refusal']}\"." if f["refusal"]
                 else "The gate did not refuse the student.")
    trade = f"The trade: {f['smaller']:.1f}x smaller than the F16 teacher for {100 * f['worse']:.1f}% more perplexity"
    if f["speed"] is not None:
        trade += f", {f['speed']:.1f}x faster to decode."
    else:
        trade += ("; no speed-up is quoted, because the benchmark says `stable: false` (" + f["unstable"] + ").")
    lines.append(trade)
    if f["energy"] in (None, "estimate-tdp", "unavailable"):
        lines.append(f"Energy: no meter readable here ({f['energy_reason'] or f['energy']}).")
    lines.append(END)
    return "\n".join(lines)


def block_of(doc: str, where: str) -> str:
    if BEGIN not in doc or END not in doc:
        raise DemoError(f"{where} has no {BEGIN} … {END} block")
    return doc[doc.index(BEGIN):doc.index(END) + len(END)]


def repeated(block: str) -> list[str]:
    """The lines --check compares: the table's first columns, and the gate's verdict."""
    out = []
    for line in block.splitlines():
        if line.startswith("| ") and not line.startswith("| ---") and line != HEADER:
            out.append(" | ".join(c.strip() for c in line.strip("|").split("|")[:REPEATED_COLUMNS]))
        elif line.startswith("The gate"):
            out.append(line)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="?", default="runs/demo", type=Path)
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--check", type=Path, metavar="DOC")
    mode.add_argument("--write", type=Path, metavar="DOC")
    args = ap.parse_args(argv)
    try:
        block = render(figures(args.runs))
        if args.check:
            doc = block_of(args.check.read_text("utf-8"), str(args.check))
            want, got = repeated(doc), repeated(block)
            if want != got:
                print(f"{args.check}'s demo figures differ from this run's ({args.runs}):", file=sys.stderr)
                for a, b in zip(want + [""] * len(got), got + [""] * len(want)):
                    if a != b:
                        print(f"  docs: {a}\n  run:  {b}", file=sys.stderr)
                return 1
            print(f"{args.check}'s demo figures match this run's ({args.runs})", file=sys.stderr)
            return 0
        if args.write:
            text = args.write.read_text("utf-8")
            args.write.write_text(text.replace(block_of(text, str(args.write)), block), "utf-8")
            return 0
        print(block)
        return 0
    except DemoError as e:
        print(f"demo_table: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
