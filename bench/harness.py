"""The benchmark harness of bench/: one timing helper, one CSV row schema, the machine written once.

Modelled on Liger-Kernel's ``benchmark/scripts/utils.py``. Every report

- times its contenders with :func:`interleaved_times` (the library's helper in
  ``ecp_fast.export.timing``, which ``ecp-fast export --measure`` uses too): rounds in which every
  contender runs one burst in turn, so a busy machine slows all alike; per contender the minimum per
  call (the least disturbed round, the figure the reports quote), the 20%, 50% and 80% quantiles;
- turns what it measured into :class:`Row` objects, one schema for every suite (times, peak memory,
  file sizes), with the case's settings in ``extra``;
- prints :func:`machine_line` once above its tables and writes its rows with :func:`write_csv`, which
  puts :func:`machine_info` (platform, CPU, versions, threads, load average, git commit) once at the top
  of the file as ``# key: value`` lines (``read_csv`` reads both back; pandas: ``comment="#"``).

Compare ratios within one run, never absolute times across runs or machines.
"""

from __future__ import annotations

import csv
import json
import os
import platform
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import astuple, dataclass, fields
from pathlib import Path
from typing import Any

import torch

from ecp_fast.export.timing import BURST_SECONDS, Timing, interleaved_times

__all__ = [
    "BURST_SECONDS",
    "FIELDS",
    "Row",
    "Timing",
    "interleaved_times",
    "machine_info",
    "machine_line",
    "markdown",
    "read_csv",
    "timing_row",
    "value_row",
    "write_csv",
]

#: Seconds per unit of the time columns.
UNITS = {"s": 1.0, "ms": 1e-3, "us": 1e-6}


@dataclass(frozen=True)
class Row:
    """One measured contender of one case; the CSV schema of every benchmark report.

    Attributes:
        suite: the report (``structured``, ``export``, ``reconstruction``, ``scale``).
        case: what is compared (the workload), e.g. ``"784-300-100-10 MLP, batch 256, 1 thread"``.
        contender: the variant measured in the case, e.g. ``"50% removed"`` or ``"csr (measured)"``.
        metric: ``"time"`` (per call), ``"peak_memory"``, ``"file_size"``, ...
        unit: of the four figures: ``"us"``, ``"ms"``, ``"s"``, ``"MiB"``, ``"GiB"``, ``"bytes"``.
        minimum, q20, median, q80: over the rounds (a single measurement repeats its value).
        rounds: how many measurements the figures summarise.
        extra: the case's settings and descriptive figures (threads, batch, parameters, ...) as JSON.
    """

    suite: str
    case: str
    contender: str
    metric: str
    unit: str
    minimum: float
    q20: float
    median: float
    q80: float
    rounds: int
    extra: str = "{}"

    def settings(self) -> dict[str, Any]:
        """``extra`` decoded."""
        return json.loads(self.extra)


FIELDS = tuple(field.name for field in fields(Row))


def timing_row(suite: str, case: str, contender: str, timing: Timing, unit: str = "us", **extra: Any) -> Row:
    """A time-per-call row from a :class:`Timing` (seconds) in ``unit``."""
    scale = 1.0 / UNITS[unit]
    return Row(
        suite,
        case,
        contender,
        "time",
        unit,
        timing.minimum * scale,
        timing.q20 * scale,
        timing.median * scale,
        timing.q80 * scale,
        timing.rounds,
        json.dumps(extra, sort_keys=False),
    )


def value_row(suite: str, case: str, contender: str, metric: str, unit: str, value: float, **extra: Any) -> Row:
    """A row of one measurement (a file size, a peak memory)."""
    return Row(suite, case, contender, metric, unit, value, value, value, value, 1, json.dumps(extra))


# ---- the machine -------------------------------------------------------------------------------------


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git_commit() -> str:
    """The commit of the checkout the benchmark runs from, ``+dirty`` with uncommitted changes."""
    root = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "--short=12", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return commit + ("+dirty" if dirty else "")


def machine_info() -> dict[str, str]:
    """The machine and versions a run measured on: written once per CSV and printed once per report."""
    import ecp_fast

    return {
        "platform": platform.platform(),
        "cpu": _cpu_name(),
        "cores": str(os.cpu_count()),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "ecp_fast": ecp_fast.__version__,
        "native_cpu_ops": str(ecp_fast.ops.NATIVE_CPU),
        "mkl": str(torch.backends.mkl.is_available()),
        "threads": str(torch.get_num_threads()),
        "load_average": " ".join(f"{load:.2f}" for load in os.getloadavg()),
        "commit": _git_commit(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %z"),
    }


def machine_line(info: Mapping[str, str] | None = None) -> str:
    """One line for the top of a report's output."""
    info = machine_info() if info is None else info
    return (
        f"machine: {info['cpu']}, {info['cores']} cores, {info['platform']}; torch {info['torch']} "
        f"(MKL {info['mkl']}, threads {info['threads']}), ecp_fast {info['ecp_fast']} at {info['commit']} "
        f"(native CPU ops {info['native_cpu_ops']}); load average {info['load_average']}"
    )


# ---- files and tables ----------------------------------------------------------------------------------


def write_csv(path: Path, rows: Sequence[Row], machine: Mapping[str, str] | None = None) -> None:
    """Rows in the one schema, below ``# key: value`` lines of the machine (default :func:`machine_info`)."""
    machine = machine_info() if machine is None else machine
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as handle:
        for key, value in machine.items():
            handle.write(f"# {key}: {value}\n")
        writer = csv.writer(handle)
        writer.writerow(FIELDS)
        writer.writerows(astuple(row) for row in rows)


def read_csv(path: Path) -> tuple[dict[str, str], list[Row]]:
    """The machine lines and the rows of a file written by :func:`write_csv`."""
    machine: dict[str, str] = {}
    with path.open(newline="") as handle:
        lines = handle.read().splitlines()
    body = []
    for line in lines:
        if line.startswith("# "):
            key, _, value = line[2:].partition(": ")
            machine[key] = value
        else:
            body.append(line)
    rows = [
        Row(
            **{name: record[name] for name in ("suite", "case", "contender", "metric", "unit", "extra")},
            **{name: float(record[name]) for name in ("minimum", "q20", "median", "q80")},
            rounds=int(record["rounds"]),
        )
        for record in csv.DictReader(body)
    ]
    return machine, rows


def markdown(
    rows: Sequence[Mapping[str, Any]],
    columns: Sequence[str],
    formats: Mapping[str, str] | None = None,
    floats: str = "",
) -> str:
    """A markdown table of ``columns``: numbers formatted with ``formats[column]``, else floats with ``floats``."""
    formats = formats or {}

    def cell(row: Mapping[str, Any], column: str) -> str:
        value = row.get(column, "")
        if isinstance(value, str):
            return value
        return format(value, formats.get(column, floats if isinstance(value, float) else ""))

    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(cell(row, column) for column in columns) + " |" for row in rows]
    return "\n".join(lines)
