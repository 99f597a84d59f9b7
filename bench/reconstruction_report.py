"""Prints the cost of reconstructive pruning on LeNet-300-100 against one-shot ECP: time and peak memory.

Workload (as in ``bench_pruner.py``): a 784-300-100-10 ReLU MLP with default initialisation, 2,048
calibration inputs uniform in [0, 1) (like pixel intensities) in batches of 256, exact Jacobian rows
of the 10 outputs, 90% sparsity. ``ecp`` is ``Pruner.calibrate`` + ``prune(0.9, method="ecp")``;
``ecp-obs`` and ``sparsegpt`` are the same calls with those methods (the allocation search included
for ``ecp-obs``). Times are minima over interleaved rounds, so a busy machine slows every contender
alike; the target is ``ecp-obs`` at most 10x ``ecp``. Peak memory is the growth of the resident
set's high-water mark (VmHWM, reset through /proc/self/clear_refs) during one call, with the model
and the inputs already resident, and blocks of 64 KiB and more mapped on their own
(``MALLOC_MMAP_THRESHOLD_``) so that freed memory leaves the count: in a fresh process (torch's
first-use memory included), after a warm-up call on a copy of the model (``warm``: what the pruning
itself holds), and warm with four and eight times the calibration samples (memory that grows with
the samples shows there). The size of the model and of its largest layer's Gram matrix (float64)
are printed beside it, and the warm difference between ``ecp-obs`` and ``ecp`` in units of the two.

Timing, the machine line and the ``--csv`` rows come from ``bench/harness.py``.

``--caches 0,0.25,1`` also times and measures ``ecp-obs`` at those ``activation_cache`` sizes (in largest
``H``; the default is 1): the trade of memory for time.

Run: ``.venv/bin/python bench/reconstruction_report.py`` (a few minutes on 2 cores; ``--threads 1``).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import warnings
from collections.abc import Sequence
from functools import partial
from pathlib import Path

import torch
from harness import Timing, interleaved_times, machine_info, machine_line, timing_row, value_row, write_csv
from torch import nn

with warnings.catch_warnings():
    warnings.simplefilter("ignore", RuntimeWarning)
    import ecp_fast

SIZES = (784, 300, 100, 10)
SAMPLES, BATCH, SPARSITY = 2048, 256, 0.9
METHODS = ("ecp", "sparsegpt", "ecp-obs")
#: Blocks from this size up are mapped on their own and given back when freed, so the resident set
#: follows what is live (otherwise the allocator keeps freed memory, and a warm process reuses it).
MMAP_THRESHOLD = 64 << 10
#: Calibration sets this many times larger are measured too: memory that grows with the samples shows.
SAMPLE_FACTORS = (4, 8)

MEMORY_CHILD = """
import copy, json, sys, warnings, torch
warnings.simplefilter("ignore")
sys.path.insert(0, "bench")
from reconstruction_report import lenet, batches, prune
method, threads, warm, samples, cache = json.loads(sys.argv[1])
torch.set_num_threads(threads)
model, data = lenet(), batches(samples=samples)
if warm:  # torch's own first-use allocations (kernels, thread pools, LAPACK workspaces) happen here
    prune(copy.deepcopy(model), data, method, cache)
def status_kib(field):
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith(field + ":"))
with open("/proc/self/clear_refs", "w") as clear_refs:
    clear_refs.write("5")
before = status_kib("VmRSS")
prune(model, data, method, cache)
print(json.dumps((status_kib("VmHWM") - before) / 1024))
"""


def lenet(seed: int = 0) -> nn.Sequential:
    """784-300-100-10 with ReLU, default initialisation."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(784, 300), nn.ReLU(), nn.Linear(300, 100), nn.ReLU(), nn.Linear(100, 10))


def batches(seed: int = 0, samples: int = SAMPLES) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``samples`` (2,048) uniform inputs with random class targets, in batches of 256."""
    generator = torch.Generator().manual_seed(seed)
    inputs = torch.rand(samples, SIZES[0], generator=generator)
    targets = torch.randint(0, SIZES[-1], (samples,), generator=generator)
    return list(zip(inputs.split(BATCH), targets.split(BATCH), strict=True))


def prune(model: nn.Module, data: list, method: str, cache: float | None = None) -> ecp_fast.PruneReport:
    """Calibrate and prune ``model`` to 90% with ``method`` (exact Jacobian rows; local for sparsegpt), as
    ``ecp_fast.prune`` does: for ``ecp-obs`` the calibration keeps the row sensitivities it weights by.
    ``cache``: the reconstruction's ``activation_cache`` (None: the default)."""
    pruner = ecp_fast.Pruner(model, sensitivity="local" if method == "sparsegpt" else "output", progress=False)
    pruner.calibrate(data, loss_fn=nn.CrossEntropyLoss(), row_sensitivities=method == "ecp-obs")
    return pruner.prune(SPARSITY, method=method, activation_cache=None if method == "ecp" else cache)


def _fresh_copy(copies: dict[str, nn.Module], method: str, model: nn.Module) -> None:
    copies[method] = copy.deepcopy(model)


def _prune_copy(copies: dict[str, nn.Module], label: str, data: list, cache: float | None = None) -> None:
    prune(copies[label], data, label.split("@")[0], cache)


def method_times(rounds: int, caches: Sequence[float] = ()) -> dict[str, Timing]:
    """Wall time of each method over interleaved rounds of one call (after one warm-up round); with
    ``caches``, ``ecp-obs`` is also timed at each of those ``activation_cache`` sizes (``ecp-obs@size``).

    Each call prunes a fresh copy of the model, made untimed before it.
    """
    model, data = lenet(), batches()
    copies: dict[str, nn.Module] = {}
    calls = {method: partial(_prune_copy, copies, method, data) for method in METHODS}
    setup = {method: partial(_fresh_copy, copies, method, model) for method in METHODS}
    for cache in caches:
        label = f"ecp-obs@{cache:g}"
        calls[label] = partial(_prune_copy, copies, label, data, cache)
        setup[label] = partial(_fresh_copy, copies, label, model)
    return interleaved_times(calls, rounds=rounds, warmup=1, burst=1, setup=setup)


def peak_memory_mib(
    method: str, threads: int, warm: bool = False, samples: int = SAMPLES, cache: float | None = None
) -> float:
    """Growth of the peak resident set during one prune call in a fresh process, MiB; with ``warm`` the
    process made one call on a copy of the model before (torch's first-use memory is then excluded);
    ``cache`` the reconstruction's ``activation_cache``."""
    result = subprocess.run(
        [sys.executable, "-c", MEMORY_CHILD, json.dumps([method, threads, warm, samples, cache])],
        env={**os.environ, "MALLOC_MMAP_THRESHOLD_": str(MMAP_THRESHOLD)},
        capture_output=True,
        text=True,
        check=True,
        timeout=600,
    )
    return float(result.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds per method (default 3)")
    parser.add_argument("--csv", type=Path, default=None, help="also write the rows to this CSV file")
    parser.add_argument(
        "--caches",
        type=lambda text: [float(size) for size in text.split(",")],
        default=[],
        help="comma-separated activation_cache sizes: also time and measure ecp-obs at each (e.g. 0,0.25,0.5,1,2)",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    machine = machine_info()
    model_mib = sum(p.numel() * p.element_size() for p in lenet().parameters()) / 2**20
    gram_mib = (SIZES[0] + 1) ** 2 * 8 / 2**20
    print(f"# {machine_line(machine)}")
    print(
        f"# LeNet-300-100 ({model_mib:.2f} MiB of float32 parameters), {SAMPLES} samples, sparsity {SPARSITY}; "
        f"largest Gram matrix (785 x 785, float64) {gram_mib:.2f} MiB"
    )
    case = f"LeNet-300-100, {SAMPLES} samples, sparsity {SPARSITY}, {args.threads} thread(s)"
    times = method_times(args.rounds, args.caches)
    rows = [timing_row("reconstruction", case, method, times[method], "s", threads=args.threads) for method in METHODS]
    print(
        "| method | seconds (min) | x ecp | peak memory, fresh process (MiB) | peak, warm (MiB) "
        + "".join(f"| peak, warm, {factor * SAMPLES} samples (MiB) " for factor in SAMPLE_FACTORS)
        + "|"
    )
    print("|---|---|---|---|---|" + "---|" * len(SAMPLE_FACTORS))
    warm: dict[str, float] = {}
    for method in METHODS:
        memory = {
            "peak_memory": peak_memory_mib(method, args.threads),
            "peak_memory_warm": peak_memory_mib(method, args.threads, warm=True),
        }
        for factor in SAMPLE_FACTORS:
            memory[f"peak_memory_warm_{factor}x_samples"] = peak_memory_mib(
                method, args.threads, warm=True, samples=factor * SAMPLES
            )
        warm[method] = memory["peak_memory_warm"]
        for metric, value in memory.items():
            rows.append(value_row("reconstruction", case, method, metric, "MiB", value, threads=args.threads))
        seconds = times[method].minimum
        figures = " | ".join(f"{value:.1f}" for value in memory.values())
        print(f"| {method} | {seconds:.3f} | {seconds / times['ecp'].minimum:.2f} | {figures} |")
    extra = warm["ecp-obs"] - warm["ecp"]
    print(
        f"# ecp-obs over ecp, warm: {extra:.1f} MiB = {extra / (model_mib + gram_mib):.2f} x (model + largest Gram "
        f"matrix, {model_mib + gram_mib:.2f} MiB)"
    )
    if args.caches:
        rows += _frontier(args.caches, times, warm, case, args.threads, model_mib + gram_mib)
    if args.csv is not None:
        write_csv(args.csv, rows, machine)
    return 0


def _frontier(
    caches: list[float], times: dict[str, Timing], warm: dict[str, float], case: str, threads: int, unit: float
) -> list[dict]:
    """Prints and returns ``ecp-obs``'s time and warm peak at each ``activation_cache`` size."""
    print("\n| activation_cache (largest H) | ecp-obs x ecp (time) | peak, warm (MiB) | over ecp, x (model + H) |")
    print("|---|---|---|---|")
    rows = []
    for cache in caches:
        label = f"ecp-obs@{cache:g}"
        peak = peak_memory_mib("ecp-obs", threads, warm=True, cache=cache)
        ratio = times[label].minimum / times["ecp"].minimum
        print(f"| {cache:g} | {ratio:.2f} | {peak:.1f} | {(peak - warm['ecp']) / unit:.2f} |")
        rows.append(timing_row("reconstruction", case, label, times[label], "s", threads=threads))
        rows.append(value_row("reconstruction", case, label, "peak_memory_warm", "MiB", peak, threads=threads))
    return rows


if __name__ == "__main__":
    sys.exit(main())
