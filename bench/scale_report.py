"""Prune a ~100M-parameter stack of transformer MLP blocks: whole-model vs sequential, time and peak memory.

Each mode runs in a fresh subprocess so that its peak resident memory (``ru_maxrss``) is its own; the
parent prints one markdown table. Run::

    nice -n 10 .venv/bin/python bench/scale_report.py

Defaults: width 1024, 12 blocks (Linear d->4d, GELU, Linear 4d->d, residual: 100.7M parameters),
2048 calibration tokens in batches of 4 x 128 tokens, ECP with the local sensitivity, 50% sparsity per
layer. ``--worker MODE`` runs one mode and prints its figures as JSON (what the parent calls).
The machine line and the ``--csv`` rows (one schema for every benchmark) come from ``bench/harness.py``.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import resource
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from harness import Row, machine_info, machine_line, value_row, write_csv
from torch import nn

logger = logging.getLogger("scale_report")

MODES = ("whole", "sequential")


class MLPBlock(nn.Module):
    """Transformer-style MLP block: ``x + fc2(gelu(fc1(x)))`` with ``fc1: d -> 4d``, ``fc2: 4d -> d``."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(width, 4 * width)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(4 * width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc2(self.act(self.fc1(x)))


def make_stack(width: int, blocks: int, seed: int = 0) -> nn.Sequential:
    """``blocks`` MLP blocks of width ``width`` with a fixed random initialisation."""
    torch.manual_seed(seed)
    return nn.Sequential(*[MLPBlock(width) for _ in range(blocks)])


def make_batches(width: int, tokens: int, batch_size: int, sequence: int, seed: int = 1) -> list[torch.Tensor]:
    """``tokens`` calibration tokens as ``(batch_size, sequence, width)`` batches (like embeddings)."""
    per_batch = batch_size * sequence
    if tokens % per_batch:
        raise ValueError(f"argument 'tokens' must be a multiple of batch_size x sequence = {per_batch}, got {tokens}")
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(batch_size, sequence, width, generator=generator) for _ in range(tokens // per_batch)]


@dataclass
class Config:
    """One benchmark setting."""

    width: int = 1024
    blocks: int = 12
    tokens: int = 2048
    batch_size: int = 4
    sequence: int = 128
    sparsity: float = 0.5
    scope: str = "layer"
    method: str = "ecp"


def prune_mode(model: nn.Module, batches: list, mode: str, config: Config) -> float:
    """Calibrate and prune ``model`` whole or block by block (``mode``), as ``config`` says; the sparsity reached."""
    from ecp_fast import Pruner
    from ecp_fast.pruning.sequential import prune_sequential

    if mode == "whole":
        pruner = Pruner(model, sensitivity="local", progress=False)
        pruner.calibrate(batches)
        return pruner.prune(sparsity=config.sparsity, method=config.method, scope=config.scope).sparsity
    if mode == "sequential":
        return prune_sequential(
            model,
            batches,
            sparsity=config.sparsity,
            method=config.method,
            sensitivity="local",
            scope=config.scope,
            progress=False,
        ).sparsity
    raise ValueError(f"argument 'mode' must be one of {MODES}, got {mode!r}")


def run_mode(mode: str, config: Config) -> dict[str, float]:
    """Build the stack and prune it in ``mode``; return seconds and the parameter count."""
    started = time.perf_counter()
    model = make_stack(config.width, config.blocks)
    batches = make_batches(config.width, config.tokens, config.batch_size, config.sequence)
    parameters = sum(parameter.numel() for parameter in model.parameters())
    build_seconds = time.perf_counter() - started
    build_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    started = time.perf_counter()
    sparsity = prune_mode(model, batches, mode, config)
    prune_seconds = time.perf_counter() - started
    return {
        "parameters": parameters,
        "build_seconds": build_seconds,
        "prune_seconds": prune_seconds,
        "sparsity": sparsity,
        "model_rss_kib": build_rss,
    }


def run_in_subprocess(mode: str, config: Config, threads: int | None) -> dict[str, float]:
    """Run one mode in a fresh interpreter and return its figures, including its peak RSS."""
    command = [sys.executable, str(Path(__file__).resolve()), "--worker", mode, "--config", json.dumps(asdict(config))]
    if threads is not None:
        command += ["--threads", str(threads)]
    started = time.perf_counter()
    completed = subprocess.run(command, check=True, capture_output=True, text=True)
    figures = json.loads(completed.stdout.strip().splitlines()[-1])
    figures["process_seconds"] = time.perf_counter() - started
    return figures


def markdown_table(config: Config, results: dict[str, dict[str, float]]) -> str:
    """The figures of every mode as a markdown table."""
    lines = [
        f"{config.blocks} MLP blocks of width {config.width} "
        f"({next(iter(results.values()))['parameters'] / 1e6:.1f}M parameters), {config.tokens} calibration tokens "
        f"in batches of {config.batch_size} x {config.sequence}, {config.method} / local sensitivity, "
        f"{config.sparsity:.0%} per {config.scope}; torch {torch.__version__}, {platform.machine()}, "
        f"{torch.get_num_threads()} threads",
        "",
        "| mode | prune wall time (s) | process wall time (s) | peak RSS (GiB) | RSS after building the model (GiB) "
        "| sparsity |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for mode, figures in results.items():
        lines.append(
            f"| {mode} | {figures['prune_seconds']:.1f} | {figures['process_seconds']:.1f} | "
            f"{figures['peak_rss_kib'] / 2**20:.2f} | {figures['model_rss_kib'] / 2**20:.2f} | "
            f"{figures['sparsity']:.4f} |"
        )
    return "\n".join(lines)


def result_rows(config: Config, results: dict[str, dict[str, float]]) -> list[Row]:
    """The figures of every mode as rows of the harness's schema."""
    case = f"{config.blocks} MLP blocks of width {config.width}, {config.tokens} tokens"
    case += f", {config.sparsity:.0%} per {config.scope}"
    settings = {**asdict(config), "threads": torch.get_num_threads()}
    rows = []
    for mode, figures in results.items():
        rows += [
            value_row("scale", case, mode, "prune_time", "s", figures["prune_seconds"], **settings),
            value_row("scale", case, mode, "process_time", "s", figures["process_seconds"], **settings),
            value_row("scale", case, mode, "peak_memory", "GiB", figures["peak_rss_kib"] / 2**20, **settings),
            value_row("scale", case, mode, "model_memory", "GiB", figures["model_rss_kib"] / 2**20, **settings),
        ]
    return rows


def main(argv: list[str] | None = None) -> None:
    """Parse arguments; as ``--worker`` run one mode, else run every mode and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", choices=MODES, help="run one mode in this process and print JSON")
    parser.add_argument("--config", help="JSON of a Config (used with --worker)")
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--width", type=int, default=Config.width)
    parser.add_argument("--blocks", type=int, default=Config.blocks)
    parser.add_argument("--tokens", type=int, default=Config.tokens)
    parser.add_argument("--batch-size", type=int, default=Config.batch_size)
    parser.add_argument("--sequence", type=int, default=Config.sequence)
    parser.add_argument("--sparsity", type=float, default=Config.sparsity)
    parser.add_argument("--scope", default=Config.scope)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--csv", type=Path, default=None, help="also write the figures to this CSV file")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.worker:
        config = Config(**json.loads(args.config)) if args.config else Config()
        figures = run_mode(args.worker, config)
        figures["peak_rss_kib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        sys.stdout.write(json.dumps(figures) + "\n")
        return
    config = Config(
        width=args.width,
        blocks=args.blocks,
        tokens=args.tokens,
        batch_size=args.batch_size,
        sequence=args.sequence,
        sparsity=args.sparsity,
        scope=args.scope,
    )
    machine = machine_info()
    print(machine_line(machine) + "\n")
    results = {mode: run_in_subprocess(mode, config, args.threads) for mode in args.modes}
    print(markdown_table(config, results))
    if args.csv is not None:
        write_csv(args.csv, result_rows(config, results), machine)


if __name__ == "__main__":
    main()
