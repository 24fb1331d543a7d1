"""`python -m benchmarks`: every figure, each in its own process, one JSON line per figure on
stdout (then a table on stderr). A figure that fails prints a line with its `error`; the
others still run, and the exit code is 1.

    python -m benchmarks                       # all figures, full size (~1.5 h on 2 CPUs)
    python -m benchmarks --quick               # small sizes: minutes (a smoke run)
    python -m benchmarks --only sae_step extraction --out results.jsonl
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

# figure module -> its arguments under --quick (tiny sizes: proves it runs, measures little)
FIGURES: dict[str, list[str]] = {
    "sae_step": ["--d_in", "64", "--expansion_factor", "8", "--batch", "512", "--steps", "2"],
    "ray_data_feed": ["--rows", "20000", "--d_in", "64", "--repeats", "1"],
    "feed_read": ["--rows", "20000", "--d_in", "64", "--repeats", "1"],
    "fit_bound": ["--widths", "64", "--mbytes", "8", "--batch", "512", "--repeats", "1"],
    "extraction": ["--model", "tiny-gpt2", "--layer", "-1", "--examples", "200", "--repeats", "1"],
    "sweep_sharing": [],  # no small version: it is two whole sweeps
    "memory_scaling": [
        *("--model", "tiny-gpt2", "--layer", "-1", "--examples", "200", "--rows", "20000")
    ],
    "trial_overhead": ["--examples", "400", "--cycles", "1"],
    "scale": ["--examples", "100", "--model", "tiny-gpt2"],
    "synthetic_quality": [
        *("--features", "512", "--hidden", "64", "--width", "512", "--tokens", "20000"),
        *("--architectures", "topk", "--eval_samples", "2000"),
    ],
    "multi_sae": ["--rows", "10000", "--k", "8", "16", "--expansion_factor", "4"],
    "gpu_flops": ["--d_in", "64", "--expansion_factor", "8", "--batch", "512", "--steps", "2"],
}
QUICK_SKIPS = {"sweep_sharing"}


def run_figure(module: str, args: list[str]) -> list[dict]:
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", f"benchmarks.{module}", *args], capture_output=True, text=True
    )
    lines = [json.loads(ln) for ln in done.stdout.splitlines() if ln.startswith('{"name"')]
    if done.returncode != 0 or not lines:  # the figures it printed stand; add the failure
        tail = done.stderr.strip().splitlines()[-1:] or [f"exit {done.returncode}"]
        lines.append({"name": module, "error": tail[0]})
    for line in lines:
        line["seconds"] = round(time.perf_counter() - started, 1)
    return lines


def table(lines: list[dict]) -> str:
    rows = [f"{'figure':38} {'ratio':>7} {'target':>9}  met"]
    for ln in lines:
        if "error" in ln:
            rows.append(f"{ln['name']:38} error: {ln['error'][:60]}")
            continue
        sign = ">=" if ln["better"] == "higher" else "<="
        rows.append(
            f"{ln['name']:38} {ln['ratio']:7.3f} {sign} {ln['target']:<6} "
            f"{'yes' if ln['met'] else 'NO'}"
        )
    return "\n".join(rows)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="+", choices=list(FIGURES), help="these figures")
    parser.add_argument("--quick", action="store_true", help="tiny sizes (sweep_sharing skipped)")
    parser.add_argument("--out", type=Path, help="also append the JSON lines to this file")
    args = parser.parse_args()
    lines: list[dict] = []
    for module, quick_args in FIGURES.items():
        if args.only and module not in args.only:
            continue
        if args.quick and module in QUICK_SKIPS:
            continue
        for line in run_figure(module, quick_args if args.quick else []):
            print(json.dumps(line), flush=True)
            if args.out:
                with args.out.open("a") as fh:
                    fh.write(json.dumps(line) + "\n")
            lines.append(line)
    print(table(lines), file=sys.stderr)
    return 1 if any("error" in ln for ln in lines) else 0


if __name__ == "__main__":
    sys.exit(main())
