"""Prints the speed of ``ecp::gram`` on CPU as a ratio to one ``torch.mm(a.T, b)`` of the same shapes.

Run: ``.venv/bin/python bench/gram_report.py`` (about a minute on 2 cores; ``--threads 2 1`` by
default). The target is a ratio of at most 1.15. Each contender's time is the minimum over
``--repeats`` rounds; the calls of one case are interleaved round by round, so a busy machine slows
them alike and the ratio stays meaningful even when the absolute times do not.
``b = a`` cases compare with ``torch.mm(a.T, a)``; the op then multiplies only the upper triangle.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from collections.abc import Callable

import torch
from ops_cases import GRAM_CASES, GramCase, make_gram_inputs, one_matmul

import ecp_fast.ops as ops


def best_times(calls: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Minimum wall time of each call over ``repeats`` interleaved rounds (after one warm-up)."""
    for call in calls.values():
        call()
    best = {name: float("inf") for name in calls}
    for _ in range(repeats):
        for name, call in calls.items():
            start = time.perf_counter()
            call()
            best[name] = min(best[name], time.perf_counter() - start)
    return best


def gram_row(case: GramCase, repeats: int) -> dict[str, float]:
    """Times of the op and of its single-matmul roofline for one case."""
    a, b, weight = make_gram_inputs(case)
    times = best_times({"gram": lambda: ops.gram(a, b, weight), "mm": lambda: one_matmul(a, b)}, repeats)
    return {"gram_ms": times["gram"] * 1e3, "mm_ms": times["mm"] * 1e3, "ratio": times["gram"] / times["mm"]}


def main(argv: list[str] | None = None) -> int:
    """Print one markdown table row per (threads, case)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, nargs="+", default=[2, 1])
    args = parser.parse_args(argv)
    print(
        f"machine: {platform.processor() or platform.machine()}, torch {torch.__version__}, "
        f"native CPU kernels: {ops.NATIVE_CPU}\n"
    )
    print("| threads | case | ecp::gram | torch.mm(a.T, b) | gram / mm |")
    print("|---|---|---|---|---|")
    previous = torch.get_num_threads()
    try:
        for threads in args.threads:
            torch.set_num_threads(threads)
            for case in GRAM_CASES:
                row = gram_row(case, args.repeats)
                print(
                    f"| {threads} | {case.id} | {row['gram_ms']:.1f} ms | {row['mm_ms']:.1f} ms | {row['ratio']:.3f} |",
                    flush=True,
                )
    finally:
        torch.set_num_threads(previous)
    return 0


if __name__ == "__main__":
    sys.exit(main())
