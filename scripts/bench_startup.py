"""Start-up cost of the CLI: wall time of `itera --help` and `itera --version` next to `python -c pass`.

Prints one JSON object: median and all samples (seconds) for each, and the ratios to bare Python.
Runs the commands interleaved so that machine noise hits all of them alike.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time

CASES = {
    "python -c pass": [sys.executable, "-c", "pass"],
    "itera --help": [sys.executable, "-m", "itera", "--help"],
    "itera --version": [sys.executable, "-m", "itera", "--version"],
    "import torch": [sys.executable, "-c", "import torch"],
}


def main(repeats: int = 7) -> None:
    samples: dict[str, list[float]] = {k: [] for k in CASES}
    for _ in range(repeats):
        for name, argv in CASES.items():
            t0 = time.perf_counter()
            subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)
            samples[name].append(time.perf_counter() - t0)
    medians = {k: statistics.median(v) for k, v in samples.items()}
    base = medians["python -c pass"]
    print(json.dumps({
        "benchmark": "startup",
        "repeats": repeats,
        "median_s": {k: round(v, 4) for k, v in medians.items()},
        "ratio_to_python": {k: round(v / base, 2) for k, v in medians.items()},
        "samples_s": {k: [round(x, 4) for x in v] for k, v in samples.items()},
    }, indent=2))


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 7)
