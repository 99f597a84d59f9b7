"""Prints the export figures: file size and CPU latency of pruned models, dense against CSR.

Run: ``nice -n 10 .venv/bin/python bench/export_report.py`` (about two minutes on 2 cores;
``--rounds`` trades time for steadier figures; ``--csv PATH`` also writes the rows).

1. LeNet-300-100 (784-300-100-10, ReLU), magnitude-pruned per layer (``ecp_fast.prune``,
   ``scope="layer"``) at 90% and 95%: state-dict and compact file sizes against the dense state dict;
   latency at batch 1 and 256 of ``export(model, "dense")`` against ``export(model, "csr")`` (modelled
   crossover) and against the CSR export whose layers were chosen by timing them (``example_inputs``).
2. One 4096x4096 Linear at 95%, batch 16.
3. torch's sparse kernels against each other (is torch's CSR path good enough?): ``addmm`` / ``mm`` /
   ``torch.sparse.mm`` with a CSR left operand, int32 and int64 indices, ``F.linear`` with a CSR weight,
   BSR 4x4, and scipy's CSR product (a plain single-threaded C++ loop: what a kernel of our own
   without MKL would start from).

``--sweep`` prints instead the density sweep behind the modelled crossover
(``ecp_fast.export.csr.modelled_max_density``): a CSR layer against ``nn.Linear`` per shape and batch.

Every comparison times its contenders interleaved (``interleaved_times`` of ``bench/harness.py``, the
library's ``ecp_fast.export.interleaved_times``: rounds of one ~1 ms burst each, ``--burst-ms``) and
reports the minimum and median per call and the ratios within the run, at one and two torch threads.
``--csv`` writes every measurement in the harness's row schema, the machine at the top.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import warnings
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import torch
from harness import Row, interleaved_times, machine_info, machine_line, markdown, timing_row, value_row, write_csv
from torch import nn
from torch.nn import functional as F

import ecp_fast
from ecp_fast.export import csr_linear, export, exported_layers, save_compact

LENET = (784, 300, 100, 10)


def lenet(sparsity: float, seed: int = 0) -> nn.Sequential:
    """LeNet-300-100 with random weights, magnitude-pruned per layer (masks through torch.nn.utils.prune)."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(784, 300), nn.ReLU(), nn.Linear(300, 100), nn.ReLU(), nn.Linear(100, 10))
    ecp_fast.prune(model, None, sparsity=sparsity, method="magnitude", scope="layer", progress=False)
    return model.eval()


def saved_bytes(obj: Any) -> int:
    """Bytes of ``torch.save(obj)``."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return len(buffer.getvalue())


def size_rows(sparsity: float) -> list[Row]:
    """File sizes of one pruned LeNet in each form."""
    model = lenet(sparsity)
    forms = {
        "checkpoint with masks (state_dict)": saved_bytes(model.state_dict()),
        "dense state_dict": saved_bytes(export(model, "dense").state_dict()),
        "csr export state_dict": saved_bytes(export(model, "csr").state_dict()),
        "save_compact file": save_compact(model, io.BytesIO()),
    }
    case = f"LeNet {sparsity:.0%}"
    return [
        value_row("export", case, form, "file_size", "bytes", size, sparsity=sparsity) for form, size in forms.items()
    ]


def size_table(rows: list[Row]) -> list[dict[str, Any]]:
    """Sizes against the dense state dict of the same case."""
    dense = {row.case: row.minimum for row in rows if row.contender == "dense state_dict"}
    return [
        {
            "sparsity": row.settings()["sparsity"],
            "form": row.contender,
            "bytes": int(row.minimum),
            "smaller_than_dense": dense[row.case] / row.minimum,
        }
        for row in rows
    ]


def timed_rows(calls: dict[str, Callable[[], object]], rounds: int, burst: float, case: str, **extra: Any) -> list[Row]:
    """One row per contender of ``calls`` timed in ``rounds`` interleaved rounds of ``burst``-second bursts."""
    with torch.inference_mode():
        times = interleaved_times(calls, rounds=rounds, burst_seconds=burst)
    return [timing_row("export", case, name, timing, "us", **extra) for name, timing in times.items()]


def ratio_table(rows: list[Row], baseline: str) -> list[dict[str, Any]]:
    """One line per row with its times and its speed-up over ``baseline`` of its case by minimum and by median."""
    keys = [(row.case, row.settings()["threads"], row.settings()["batch"]) for row in rows]
    base = {key: row for key, row in zip(keys, rows, strict=True) if row.contender == baseline}
    return [
        {
            **row.settings(),
            "case": row.case,
            "contender": row.contender,
            "min_us": row.minimum,
            "median_us": row.median,
            "speedup_min": base[key].minimum / row.minimum,
            "speedup_median": base[key].median / row.median,
        }
        for key, row in zip(keys, rows, strict=True)
    ]


def lenet_rows(sparsity: float, threads: int, rounds: int, burst: float) -> list[Row]:
    """Dense vs CSR (modelled and measured choice) LeNet latency at batch 1 and 256."""
    torch.set_num_threads(threads)
    model = lenet(sparsity)
    rows = []
    for batch in (1, 256):
        x = torch.randn(batch, 784, generator=torch.Generator().manual_seed(batch))
        models = {
            "dense": export(model, "dense"),
            "csr (modelled)": export(model, "csr"),
            "csr (measured)": export(model, "csr", example_inputs=x),
        }
        measured = timed_rows(
            {name: partial(exported, x) for name, exported in models.items()},
            rounds,
            burst,
            f"LeNet {sparsity:.0%}",
            threads=threads,
            batch=batch,
        )
        for row in measured:  # which layers each export made CSR
            layers = "/".join(kind for kind in exported_layers(models[row.contender]).values())
            rows.append(dataclasses.replace(row, extra=json.dumps({**row.settings(), "layers": layers})))
    return rows


def big_layer_rows(threads: int, rounds: int, burst: float, size: int = 4096, batch: int = 16) -> list[Row]:
    """One ``size`` x ``size`` Linear at 95%, dense vs CSR."""
    torch.set_num_threads(threads)
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(size, size))
    ecp_fast.prune(model, None, sparsity=0.95, method="magnitude", scope="layer", progress=False)
    x = torch.randn(batch, size)
    dense, sparse = export(model, "dense"), export(model, "csr")
    assert exported_layers(sparse) == {"0": "csr"}
    calls: dict[str, Callable[[], object]] = {"dense": partial(dense, x), "csr": partial(sparse, x)}
    return timed_rows(calls, rounds, burst, f"{size}x{size} 95%", threads=threads, batch=batch)


def kernel_calls(out: int, inp: int, batch: int, density: float) -> dict[str, Callable[[], object]]:
    """torch's (and scipy's) ways to compute ``x @ W.T + b`` for a ``density``-sparse ``W``."""
    import scipy.sparse

    generator = torch.Generator().manual_seed(2)
    weight = torch.randn(out, inp, generator=generator)
    weight = weight * (torch.rand(out, inp, generator=generator) < density)
    bias, x = torch.randn(out, generator=generator), torch.randn(batch, inp, generator=generator)
    csr64 = weight.to_sparse_csr()
    csr32 = torch.sparse_csr_tensor(
        csr64.crow_indices().int(), csr64.col_indices().int(), csr64.values(), (out, inp), check_invariants=True
    )
    bsr = weight.to_sparse_bsr((4, 4)) if out % 4 == 0 and inp % 4 == 0 else None
    column = bias.unsqueeze(1)
    scipy_weight, x_numpy, bias_numpy = scipy.sparse.csr_matrix(weight.numpy()), x.numpy(), bias.numpy()
    calls: dict[str, Callable[[], object]] = {
        "dense F.linear": lambda: F.linear(x, weight, bias),
        "addmm(b, csr32, x.T)": lambda: torch.addmm(column, csr32, x.t()),
        "addmm(b, csr64, x.T)": lambda: torch.addmm(column, csr64, x.t()),
        "csr32 @ x.T + b": lambda: (csr32 @ x.t()).t() + bias,
        "torch.sparse.mm(csr32, x.T) + b": lambda: torch.sparse.mm(csr32, x.t()).t() + bias,
        "F.linear(x, csr32, b)": lambda: F.linear(x, csr32, bias),
        "scipy csr @ x.T + b": lambda: (scipy_weight @ x_numpy.T).T + bias_numpy,
    }
    if bsr is not None:
        calls["addmm(b, bsr4x4, x.T)"] = lambda: torch.addmm(column, bsr, x.t())
    return calls


def kernel_rows(threads: int, rounds: int, burst: float) -> list[Row]:
    """The kernel comparison at the report's shapes, 95% sparse."""
    torch.set_num_threads(threads)
    rows = []
    for out, inp, batch in ((300, 784, 1), (300, 784, 256), (4096, 4096, 16)):
        # F.linear with a CSR weight fails under inference_mode (torch 2.13), so this runs under no_grad.
        with torch.no_grad():
            times = interleaved_times(kernel_calls(out, inp, batch, 0.05), rounds=rounds, burst_seconds=burst)
        case = f"{out}x{inp} 95% kernels"
        rows += [
            timing_row("export", case, name, timing, "us", threads=threads, batch=batch)
            for name, timing in times.items()
        ]
    return rows


SWEEP_SHAPES = ((10, 100), (100, 300), (300, 784), (1024, 1024), (1024, 4096), (4096, 4096))
SWEEP_DENSITIES = (0.02, 0.05, 0.1, 0.2, 0.3, 0.5)


def sweep_rows(threads: int, rounds: int, burst: float) -> list[Row]:
    """Speed-up of a CSR layer (``csr_linear``, call overhead included) over ``nn.Linear`` per shape, batch, density.

    The data behind :func:`ecp_fast.export.csr.modelled_max_density`.
    """
    torch.set_num_threads(threads)
    rows = []
    for out, inp in SWEEP_SHAPES:
        for batch in (1, 16, 64, 256):
            if out * inp * batch > 4096 * 4096 * 64:
                continue
            generator = torch.Generator().manual_seed(3)
            dense = nn.Linear(inp, out)
            uniform = torch.rand(out, inp, generator=generator)
            x = torch.randn(batch, inp, generator=generator)
            calls: dict[str, Callable[[], object]] = {"dense": partial(dense, x)}
            for density in SWEEP_DENSITIES:
                layer = nn.Linear(inp, out)
                with torch.no_grad():
                    layer.weight.copy_(dense.weight * (uniform < density))
                    layer.bias.copy_(dense.bias)
                calls[f"{density:g}"] = partial(csr_linear(layer), x)
            rounds_here = max(3, rounds if out * inp < 2**20 else rounds // 4)
            rows += timed_rows(calls, rounds_here, burst, f"{out}x{inp}", threads=threads, batch=batch)
    return rows


def sweep_table(rows: list[Row]) -> list[dict[str, Any]]:
    """One line per shape and batch: the dense time and the speed-up of a CSR layer at each density."""
    lines: dict[tuple[int, str, int], dict[str, Any]] = {}
    for row in rows:
        settings = row.settings()
        key = (settings["threads"], row.case, settings["batch"])
        if row.contender == "dense":
            lines[key] = {"threads": settings["threads"], "shape": row.case, "batch": settings["batch"]}
            lines[key]["dense_us"] = dense_us = row.minimum
        else:
            lines[key][f"d={row.contender}"] = dense_us / row.minimum
    return list(lines.values())


def table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    """A markdown table of ``columns`` (floats to 2 decimals, microseconds to 1, bytes with separators)."""
    formats = {column: ".1f" for column in columns if column.endswith("_us")} | {"bytes": ","}
    return markdown(rows, columns, formats, floats=".2f")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=30, help="interleaved timing rounds (default 30)")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="torch threads (default 1 2)")
    parser.add_argument("--burst-ms", type=float, default=1.0, help="length of one timed burst (default 1 ms)")
    parser.add_argument("--skip-kernels", action="store_true", help="skip the kernel comparison")
    parser.add_argument(
        "--sweep", action="store_true", help="only the density sweep behind the modelled crossover (a few minutes)"
    )
    parser.add_argument("--csv", type=Path, default=None, help="also write every row to this CSV file")
    args = parser.parse_args()
    burst = args.burst_ms / 1e3
    warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
    machine = machine_info()
    print(f"{machine_line(machine)}; {args.rounds} interleaved rounds of {args.burst_ms:g} ms bursts\n")
    if args.sweep:
        rows = [row for threads in args.threads for row in sweep_rows(threads, args.rounds, burst)]
        print("## Speed-up of a CSR layer over nn.Linear by weight density (> 1: CSR faster)\n")
        sweep = sweep_table(rows)
        print(table(sweep, list(sweep[0])))
    else:
        rows = report(args, burst)
    if args.csv is not None:
        write_csv(args.csv, rows, machine)


def report(args: argparse.Namespace, burst: float) -> list[Row]:
    """Print the size, latency and kernel tables; return their rows."""
    sizes = [row for sparsity in (0.9, 0.95) for row in size_rows(sparsity)]
    print("## File size, LeNet-300-100\n")
    print(table(size_table(sizes), ["sparsity", "form", "bytes", "smaller_than_dense"]))
    speed = []
    for threads in args.threads:
        speed += [row for sparsity in (0.9, 0.95) for row in lenet_rows(sparsity, threads, args.rounds, burst)]
        speed += big_layer_rows(threads, max(5, args.rounds // 3), burst)
    print("\n## Latency: dense against CSR (speed-up > 1: CSR faster)\n")
    columns = [
        "case",
        "threads",
        "batch",
        "contender",
        "layers",
        "min_us",
        "median_us",
        "speedup_min",
        "speedup_median",
    ]
    print(table(ratio_table(speed, "dense"), columns))
    kernels = []
    if not args.skip_kernels:
        kernels = [row for threads in args.threads for row in kernel_rows(threads, max(5, args.rounds // 3), burst)]
        print("\n## torch's sparse kernels, 95% sparse weight (speed-up over dense F.linear)\n")
        columns.remove("layers")
        print(table(ratio_table(kernels, "dense F.linear"), columns))
    return sizes + speed + kernels


if __name__ == "__main__":
    main()
