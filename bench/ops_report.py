"""Prints the CPU op figures of docs/benchmarks.md: speed ratios and peak extra memory.

Run: ``.venv/bin/python bench/ops_report.py`` (about two minutes on 2 cores). Speed is the minimum
over repeats of each call, interleaved so that a busy machine slows every contender alike; memory is
the growth of the peak resident set (VmHWM, reset through /proc/self/clear_refs) of a fresh
process during one call, with the inputs already resident; it includes the op's outputs.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time

import torch
from ops_cases import CPU_CASES, OpCase, make_layer_inputs, two_matmuls

import ecp_fast
from ecp_fast.ops import reference

MEMORY_CHILD = """
import json, sys, torch
import ecp_fast
from ecp_fast.ops import reference
n, fan_in, fan_out, which = json.loads(sys.argv[1])
generator = torch.Generator().manual_seed(0)
x = torch.randn(n, fan_in, generator=generator).relu_()
g = torch.randn(n, fan_out, generator=generator)
weight = torch.randn(fan_out, fan_in, generator=generator)
op = ecp_fast.score if which == "native" else reference.score
def status_kib(field):
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith(field + ":"))
op(x[:64], g[:64], weight)  # load libraries and warm the allocator outside the measurement
with open("/proc/self/clear_refs", "w") as clear_refs:
    clear_refs.write("5")  # resets the peak resident set (VmHWM) to the current one
before = status_kib("VmRSS")
result = op(x, g, weight)
peak = status_kib("VmHWM")
print(json.dumps({"extra_mib": (peak - before) / 1024, "inputs_mib": (x.nbytes + g.nbytes) / 2**20,
                  "outputs_mib": sum(t.nbytes for t in result) / 2**20}))
"""


def best_times(calls: dict, repeats: int) -> dict[str, float]:
    """Minimum wall time of each call over ``repeats`` interleaved rounds."""
    for call in calls.values():
        call()  # warm-up
    best = {name: float("inf") for name in calls}
    for _ in range(repeats):
        for name, call in calls.items():
            start = time.perf_counter()
            call()
            best[name] = min(best[name], time.perf_counter() - start)
    return best


def speed_row(case: OpCase, repeats: int) -> dict:
    x, g, weight = make_layer_inputs(case)
    fast = best_times({"score": lambda: ecp_fast.score(x, g, weight), "two_mm": lambda: two_matmuls(x, g)}, repeats)
    slow = best_times({"reference": lambda: reference.score(x, g, weight)}, max(1, repeats // 4))
    return {"case": case.id, **fast, **slow, "gflops": case.gemm_flops / fast["score"] / 1e9}


def memory_row(n: int, fan_in: int, fan_out: int, which: str) -> dict:
    output = subprocess.run(
        [sys.executable, "-c", MEMORY_CHILD, json.dumps([n, fan_in, fan_out, which])],
        check=True,
        capture_output=True,
        text=True,
    )
    return json.loads(output.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=8)
    args = parser.parse_args()
    print(
        f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
        f"torch {torch.__version__}\n"
    )
    print("| shape | ecp::score | 2 x torch.mm | score / 2 mm | reference | reference / score | score GFLOP/s |")
    print("|---|---|---|---|---|---|---|")
    for case in CPU_CASES:
        row = speed_row(case, args.repeats)
        print(
            f"| {row['case']} | {row['score'] * 1e3:.1f} ms | {row['two_mm'] * 1e3:.1f} ms | "
            f"{row['score'] / row['two_mm']:.2f} | {row['reference'] * 1e3:.0f} ms | "
            f"{row['reference'] / row['score']:.1f} | {row['gflops']:.0f} |"
        )
    print("\n| N=65536, in=out=1024, fp32 | peak extra memory | of which outputs |")
    print("|---|---|---|")
    for which in ("native", "reference"):
        row = memory_row(65536, 1024, 1024, which)
        print(
            f"| {which} ecp.score (inputs {row['inputs_mib']:.0f} MiB) | {row['extra_mib']:.1f} MiB | "
            f"{row['outputs_mib']:.0f} MiB |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
