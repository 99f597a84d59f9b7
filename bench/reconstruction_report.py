"""Prints the cost of reconstructive pruning on LeNet-300-100 against one-shot ECP: time and peak memory.

Workload (as in ``bench_pruner.py``): a 784-300-100-10 ReLU MLP with default initialisation, 2,048
calibration inputs uniform in [0, 1) (like pixel intensities) in batches of 256, exact Jacobian rows
of the 10 outputs, 90% sparsity. ``ecp`` is ``Pruner.calibrate`` + ``prune(0.9, method="ecp")``;
``ecp-obs`` and ``sparsegpt`` are the same calls with those methods (the allocation search included
for ``ecp-obs``). Times are minima over interleaved rounds, so a busy machine slows every contender
alike; the target is ``ecp-obs`` at most 10x ``ecp``. Peak memory is the growth of the resident set's
high-water mark (VmHWM, reset through /proc/self/clear_refs) of a fresh process during one call, with
the model and the inputs already resident; the size of the model and of its largest layer's Gram
matrix (float64) are printed beside it.

Run: ``.venv/bin/python bench/reconstruction_report.py`` (a few minutes on 2 cores; ``--threads 1``).
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import subprocess
import sys
import time
import warnings

import torch
from torch import nn

with warnings.catch_warnings():
    warnings.simplefilter("ignore", RuntimeWarning)
    import ecp_fast

SIZES = (784, 300, 100, 10)
SAMPLES, BATCH, SPARSITY = 2048, 256, 0.9
METHODS = ("ecp", "sparsegpt", "ecp-obs")

MEMORY_CHILD = """
import json, sys, warnings, torch
warnings.simplefilter("ignore")
sys.path.insert(0, "bench")
from reconstruction_report import lenet, batches, prune
method, threads = json.loads(sys.argv[1])
torch.set_num_threads(threads)
model, data = lenet(), batches()
def status_kib(field):
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith(field + ":"))
with open("/proc/self/clear_refs", "w") as clear_refs:
    clear_refs.write("5")
before = status_kib("VmRSS")
prune(model, data, method)
print(json.dumps((status_kib("VmHWM") - before) / 1024))
"""


def lenet(seed: int = 0) -> nn.Sequential:
    """784-300-100-10 with ReLU, default initialisation."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(784, 300), nn.ReLU(), nn.Linear(300, 100), nn.ReLU(), nn.Linear(100, 10))


def batches(seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """2,048 uniform inputs with random class targets, in batches of 256."""
    generator = torch.Generator().manual_seed(seed)
    inputs = torch.rand(SAMPLES, SIZES[0], generator=generator)
    targets = torch.randint(0, SIZES[-1], (SAMPLES,), generator=generator)
    return list(zip(inputs.split(BATCH), targets.split(BATCH)))


def prune(model: nn.Module, data: list, method: str) -> ecp_fast.PruneReport:
    """Calibrate and prune ``model`` to 90% with ``method`` (exact Jacobian rows; local for sparsegpt)."""
    pruner = ecp_fast.Pruner(model, sensitivity="local" if method == "sparsegpt" else "output", progress=False)
    pruner.calibrate(data, loss_fn=nn.CrossEntropyLoss())
    return pruner.prune(SPARSITY, method=method)


def best_times(rounds: int) -> dict[str, float]:
    """Minimum wall time of each method over interleaved rounds (after one warm-up round)."""
    model, data = lenet(), batches()
    best = {method: float("inf") for method in METHODS}
    for round_index in range(rounds + 1):
        for method in METHODS:
            copy_of_model = copy.deepcopy(model)
            start = time.perf_counter()
            prune(copy_of_model, data, method)
            if round_index:  # the first round warms caches and libraries
                best[method] = min(best[method], time.perf_counter() - start)
    return best


def peak_memory_mib(method: str, threads: int) -> float:
    """Growth of the peak resident set of a fresh process during one prune call, MiB."""
    result = subprocess.run(
        [sys.executable, "-c", MEMORY_CHILD, json.dumps([method, threads])],
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
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model_mib = sum(p.numel() * p.element_size() for p in lenet().parameters()) / 2**20
    gram_mib = (SIZES[0] + 1) ** 2 * 8 / 2**20
    print(
        f"# {platform.processor() or platform.machine()}, torch {torch.__version__}, threads {args.threads}, "
        f"native CPU kernels {ecp_fast.ops.NATIVE_CPU}"
    )
    print(
        f"# LeNet-300-100 ({model_mib:.2f} MiB of float32 parameters), {SAMPLES} samples, sparsity {SPARSITY}; "
        f"largest Gram matrix (785 x 785, float64) {gram_mib:.2f} MiB"
    )
    times = best_times(args.rounds)
    print("| method | seconds (min) | x ecp | peak extra memory (MiB) |")
    print("|---|---|---|---|")
    for method in METHODS:
        memory = peak_memory_mib(method, args.threads)
        print(f"| {method} | {times[method]:.3f} | {times[method] / times['ecp']:.2f} | {memory:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
