"""``ecp-fast experiment diffusion-sorption``: pruning an MLP surrogate of PDEBench's 1D diffusion-sorption.

Data (:mod:`ecp_fast.apps.pde`): trajectories of ``u_t = D / R(u) u_xx`` on ``--cells`` cells (PDEBench
uses 1024; 64 here), 101 snapshots every 5 s on ``(0, 500]`` as in PDEBench's published set,
from constant initial levels drawn uniformly from ``(0, 0.2)``. They are cached under
``--cache-dir``. Trajectories are split into training and test sets.

Surrogate: one step of ``--horizon`` snapshots, ``u(t) -> u(t + horizon * 5 s)``, learnt by a tanh MLP
with a skip connection, ``y = x + MLP(x)`` (``--hidden``, default 64-32-32-64), trained with Adam on
the mean squared error. Gaussian noise of standard deviation ``level * std(training targets)`` is
added to the training targets, for every ``--noise`` level; the test targets stay clean.

Pruning: per noise level and seed, the trained surrogate is calibrated on ``--calibration-samples``
training pairs (sensitivity ``output`` with ``--probes`` Rademacher probes, since the 64 outputs are more
than the 32 the pruner computes exactly; the MSE loss is passed for ``gradient`` and ``taylor``) and
pruned globally with every method at every ratio, ECP also iteratively, then fine-tuned at
``--finetune-ratios`` with the masks kept. The exact ``nonlinear`` baseline is calibrated on the first
``--nonlinear-samples`` pairs. The test metric is the mean squared error on the clean test pairs.

Writes to ``--out``: ``diffusion_sorption_results.csv``, ``diffusion_sorption_summary.csv``,
``diffusion_sorption_tables.md`` (the tables printed on stdout) and ``diffusion_sorption_mse.png``
(and ``diffusion_sorption_mse_finetuned.png``).
"""

from __future__ import annotations

import argparse
import itertools
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from ecp_fast.apps.errors import UsageError
from ecp_fast.apps.experiments._common import (
    DEFAULT_RATIOS,
    QUICK_RATIOS,
    RECONSTRUCTIVE_RUNS,
    SweepConfig,
    add_methods_option,
    batches_of,
    check_counts,
    check_number,
    finish_report,
    limit_threads,
    markdown_table,
    nonlinear_fits,
    parse_numbers,
    parse_ratios,
    plot_panels,
    shuffled_batches,
    summarise,
    sweep,
    where,
    write_csv,
)
from ecp_fast.apps.pde import DiffusionSorption, load_or_generate
from ecp_fast.pruning.importance import IMPORTANCES

logger = logging.getLogger(__name__)

NAME = "diffusion-sorption"
HELP = "MLP surrogate of PDEBench's 1D diffusion-sorption: test MSE of every pruning method vs pruning ratio"

METRICS = ("test_mse",)


class Surrogate(nn.Module):
    """``y = x + MLP(x)``: a tanh MLP predicting the change of the state over one surrogate step."""

    def __init__(self, cells: int, hidden: tuple[int, ...]) -> None:
        super().__init__()
        sizes = (cells, *hidden, cells)
        layers: list[nn.Module] = []
        for index, (fan_in, fan_out) in enumerate(itertools.pairwise(sizes)):
            layers.append(nn.Linear(fan_in, fan_out))
            if index < len(sizes) - 2:
                layers.append(nn.Tanh())
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The predicted state one surrogate step later."""
        return x + self.net(x)


def make_pairs(trajectories: np.ndarray, horizon: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(u(t_k), u(t_{k + horizon}))`` for every trajectory and snapshot, as float32 ``(N, cells)``."""
    inputs = trajectories[:, :-horizon].reshape(-1, trajectories.shape[-1])
    targets = trajectories[:, horizon:].reshape(-1, trajectories.shape[-1])
    return torch.tensor(inputs, dtype=torch.float32), torch.tensor(targets, dtype=torch.float32)


def train(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int, lr: float, seed: int, progress: bool
) -> nn.Module:
    """Adam on shuffled batches of 256 with a cosine learning-rate decay; deterministic for ``seed``."""
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    steps_per_epoch = (x.shape[0] + 255) // 256
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs * steps_per_epoch)
    loss_fn = nn.MSELoss()
    model.train()
    for _ in tqdm(range(epochs), desc=f"train surrogate seed {seed}", disable=not progress, leave=False):
        order = torch.randperm(x.shape[0], generator=generator)
        for start in range(0, x.shape[0], 256):
            index = order[start : start + 256]
            optimizer.zero_grad(set_to_none=True)
            loss_fn(model(x[index]), y[index]).backward()
            optimizer.step()
            schedule.step()
    model.eval()
    return model


def make_evaluate(x: torch.Tensor, y: torch.Tensor) -> Callable[[nn.Module], dict[str, float]]:
    """``evaluate(model) -> {"test_mse"}`` on clean test pairs."""

    @torch.no_grad()
    def evaluate(model: nn.Module) -> dict[str, float]:
        model.eval()
        return {"test_mse": float((model(x) - y).square().mean())}

    return evaluate


def _floats(text: str) -> tuple[float, ...]:
    return tuple(float(part) for part in text.split(",") if part.strip())


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in text.split(",") if part.strip())


def _add_pruning_options(parser: argparse.ArgumentParser) -> None:
    """Pruning: ratios, calibration, methods, fine-tuning, --quick."""
    parser.add_argument(
        "--ratios", default=DEFAULT_RATIOS, help=f"pruning ratios in percent (default {DEFAULT_RATIOS})"
    )
    parser.add_argument(
        "--calibration-samples", type=int, default=2048, help="training pairs streamed for calibration (default 2048)"
    )
    parser.add_argument(
        "--probes",
        type=int,
        default=16,
        help="Rademacher probes of the output sensitivity (default 16; 0: exact rows, <= 32 outputs)",
    )
    parser.add_argument("--iterative-steps", type=int, default=5, help="steps of iterative ECP (default 5)")
    parser.add_argument(
        "--nonlinear-samples",
        type=int,
        default=64,
        help="calibration pairs of the exact nonlinear baseline (default 64)",
    )
    parser.add_argument(
        "--finetune-ratios",
        default="50,80,90,95",
        help="ratios at which the pruned surrogates are also fine-tuned (default 50,80,90,95)",
    )
    parser.add_argument(
        "--finetune-steps",
        type=int,
        default=100,
        help="Adam steps (batch 256, lr 1e-3) of each fine-tuning on the noisy targets (default 100)",
    )
    add_methods_option(parser, "methods to run (default all)")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="seconds: 1 seed, 32 cells, 12/4 trajectories, 2 noise levels, ratios 50 and 90",
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``ecp-fast experiment diffusion-sorption``."""
    parser.add_argument(
        "--out",
        type=Path,
        default=Path("runs/diffusion-sorption"),
        help="output folder (default runs/diffusion-sorption)",
    )
    parser.add_argument(
        "--cache-dir",
        type=Path,
        default=Path("~/.cache/ecp_fast"),
        help="where the generated trajectories are cached (default ~/.cache/ecp_fast)",
    )
    parser.add_argument("--seeds", type=int, default=3, help="surrogates trained per noise level (default 3)")
    parser.add_argument("--seed", type=int, default=0, help="first seed; also seeds the data (default 0)")
    parser.add_argument("--cells", type=int, default=64, help="grid cells of the solver (default 64)")
    parser.add_argument("--train-trajectories", type=int, default=96, help="training trajectories (default 96)")
    parser.add_argument("--test-trajectories", type=int, default=32, help="test trajectories (default 32)")
    parser.add_argument(
        "--horizon", type=int, default=5, help="surrogate step in snapshots of 5 s (default 5, i.e. 25 s)"
    )
    parser.add_argument(
        "--noise",
        default="0,1e-3,1e-2,1e-1",
        help="relative noise levels of the training targets (default 0,1e-3,1e-2,1e-1)",
    )
    parser.add_argument("--hidden", default="32,32", help="hidden widths of the surrogate MLP (default 32,32)")
    parser.add_argument("--epochs", type=int, default=40, help="training epochs (default 40)")
    parser.add_argument("--lr", type=float, default=3e-3, help="Adam learning rate, cosine decay (default 3e-3)")
    _add_pruning_options(parser)


def validate(args: argparse.Namespace) -> None:
    """Check every option before the run (the command line calls it; also under ``--quick``)."""
    parse_ratios(args.ratios, option="--ratios")
    parse_ratios(args.finetune_ratios, option="--finetune-ratios")
    if not parse_numbers(args.noise, "--noise", float, 0.0):
        raise UsageError(f"--noise needs at least one level, got {args.noise!r}")
    parse_numbers(args.hidden, "--hidden", int, 1)
    check_counts(
        args,
        {
            "seeds": 1,
            "cells": 1,
            "train_trajectories": 1,
            "test_trajectories": 1,
            "horizon": 1,
            "epochs": 0,
            "calibration_samples": 1,
            "probes": 0,
            "iterative_steps": 0,
            "nonlinear_samples": 1,
            "finetune_steps": 0,
        },
    )
    check_number(args, "lr", low=0.0)


@dataclass(frozen=True)
class _Plan:
    """The settings of one run, ``--quick`` applied."""

    ratios: tuple[float, ...]
    finetune_ratios: tuple[float, ...]
    seeds: int
    cells: int
    train_count: int
    test_count: int
    noise_levels: tuple[float, ...]
    hidden: tuple[int, ...]
    epochs: int
    calibration_samples: int
    nonlinear_samples: int
    finetune_steps: int
    probes: int | None
    requested: tuple[str, ...]

    @property
    def architecture(self) -> str:
        """The surrogate's widths, ``cells-hidden...-cells``."""
        return "-".join(map(str, (self.cells, *self.hidden, self.cells)))


def _plan(args: argparse.Namespace) -> _Plan:
    quick = bool(args.quick)
    ratios = QUICK_RATIOS if quick else parse_ratios(args.ratios)
    seeds = 1 if quick else args.seeds
    if seeds < 1:
        raise UsageError(f"--seeds must be at least 1, got {seeds}")
    noise_levels = (0.0, 1e-2) if quick else _floats(args.noise)
    if len(noise_levels) < 1:
        raise UsageError("--noise needs at least one level")
    return _Plan(
        ratios=ratios,
        finetune_ratios=(0.9,) if quick else tuple(r for r in parse_ratios(args.finetune_ratios) if r in ratios),
        seeds=seeds,
        cells=32 if quick else args.cells,
        train_count=12 if quick else args.train_trajectories,
        test_count=4 if quick else args.test_trajectories,
        noise_levels=noise_levels,
        hidden=(16,) if quick else _ints(args.hidden),
        epochs=5 if quick else args.epochs,
        calibration_samples=256 if quick else args.calibration_samples,
        nonlinear_samples=16 if quick else args.nonlinear_samples,
        finetune_steps=5 if quick else args.finetune_steps,
        probes=args.probes if args.probes > 0 else None,
        requested=tuple(args.methods) if args.methods else (*IMPORTANCES, *RECONSTRUCTIVE_RUNS),
    )


@dataclass
class _Runs:
    """The simulated data and the sweep of one noise level and seed at a time."""

    args: argparse.Namespace
    plan: _Plan
    problem: DiffusionSorption
    times: np.ndarray
    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    nonlinear_notes: list[str] = field(default_factory=list)

    @property
    def target_std(self) -> float:
        """The std of the clean training targets (the unit of the noise levels)."""
        return float(self.train_y.std())

    def sweep(self, noise: float, seed: int, evaluate: Callable[[nn.Module], dict[str, float]]) -> list[dict[str, Any]]:
        """Train a surrogate on targets with ``noise`` and prune copies of it with every method."""
        args, plan, train_x = self.args, self.plan, self.train_x
        progress = True
        generator = torch.Generator().manual_seed(10_000 + seed)
        noisy_y = self.train_y + noise * self.target_std * torch.randn(self.train_y.shape, generator=generator)
        torch.manual_seed(seed)
        model = train(Surrogate(plan.cells, plan.hidden), train_x, noisy_y, plan.epochs, args.lr, seed, progress)
        order = torch.randperm(train_x.shape[0], generator=torch.Generator().manual_seed(seed))
        calibration_x, calibration_y = (
            train_x[order[: plan.calibration_samples]],
            noisy_y[order[: plan.calibration_samples]],
        )
        calibration = batches_of(calibration_x, calibration_y, 512)
        nonlinear_batches = batches_of(
            calibration_x[: plan.nonlinear_samples], calibration_y[: plan.nonlinear_samples], 512
        )
        run_methods = methods = tuple(m for m in plan.requested if m in IMPORTANCES)
        if "nonlinear" in methods:
            reason = nonlinear_fits(model, nonlinear_batches)
            if reason is not None:
                run_methods = tuple(m for m in methods if m != "nonlinear")
                self.nonlinear_notes.append(f"noise {noise:g} seed {seed}: nonlinear skipped: {reason}")
                logger.warning(self.nonlinear_notes[-1])
        config = SweepConfig(
            methods=run_methods,
            sparsities=plan.ratios,
            iterative_steps=args.iterative_steps,
            sensitivity="output",
            probes=plan.probes,
            finetune_sparsities=plan.finetune_ratios,
            finetune_steps=plan.finetune_steps,
            progress=progress,
            reconstructive=tuple(m for m in plan.requested if m in RECONSTRUCTIVE_RUNS),
        )
        finetune_batches = shuffled_batches(train_x, noisy_y, 256, seed + 1000)
        return sweep(
            model,
            config,
            calibration,
            nn.MSELoss(),
            evaluate,
            finetune_batches,
            seed,
            {"noise": noise},
            nonlinear_batches=nonlinear_batches,
        )


def _runs(args: argparse.Namespace, plan: _Plan) -> _Runs:
    """Simulate (or read from the cache) the trajectories and cut them into training and test pairs."""
    problem = DiffusionSorption()
    levels, times, trajectories = load_or_generate(
        args.cache_dir, plan.train_count + plan.test_count, plan.cells, seed=args.seed, problem=problem, progress=True
    )
    train_x, train_y = make_pairs(trajectories[: plan.train_count], args.horizon)
    test_x, test_y = make_pairs(trajectories[plan.train_count :], args.horizon)
    return _Runs(args, plan, problem, times, train_x, train_y, test_x, test_y)


def _select(noise: float, finetuned: bool) -> Callable[[dict[str, Any]], bool]:
    return where("noise", noise, finetuned)


def _plots(summary: list[dict[str, Any]], out: Path, plan: _Plan) -> None:
    plot_panels(
        summary,
        out / "diffusion_sorption_mse.png",
        [(f"noise {noise:g}, no fine-tuning", _select(noise, False)) for noise in plan.noise_levels],
        "test_mse",
        "test MSE (mean ± std over seeds)",
        f"Diffusion-sorption surrogate {plan.architecture}, global pruning",
    )
    if plan.finetune_ratios:
        plot_panels(
            summary,
            out / "diffusion_sorption_mse_finetuned.png",
            [
                (f"noise {noise:g}, fine-tuned {plan.finetune_steps} steps", _select(noise, True))
                for noise in plan.noise_levels
            ],
            "test_mse",
            "test MSE (mean ± std over seeds)",
            f"Diffusion-sorption surrogate {plan.architecture}, global pruning + fine-tuning (masks kept)",
        )


def _report_lines(args: argparse.Namespace, runs: _Runs, summary: list[dict[str, Any]]) -> list[str]:
    plan, times = runs.plan, runs.times
    lines = [
        f"# Diffusion-sorption surrogate {plan.architecture}: global pruning "
        f"(seeds {args.seed}..{args.seed + plan.seeds - 1}, mean ± std over seeds)",
        "",
        f"Data: {plan.cells} cells, {len(times)} snapshots on [0, {runs.problem.t_end:g}] s, {plan.train_count} "
        f"training / {plan.test_count} test trajectories; surrogate step {args.horizon} snapshots "
        f"({args.horizon * (times[1] - times[0]):g} s); {runs.train_x.shape[0]} training / {runs.test_x.shape[0]} "
        f"test pairs. Training: {plan.epochs} epochs Adam lr {args.lr:g} (cosine), batch 256; noise std = level x "
        f"{runs.target_std:.4f} (the std of the clean training targets). Calibration: {plan.calibration_samples} "
        f"pairs, sensitivity 'output' with {plan.probes if plan.probes else 'exact'} probes; nonlinear on "
        f"{plan.nonlinear_samples} pairs. ecp-iterative: {args.iterative_steps} steps. Metric: test MSE on clean "
        "targets. Bold: best mean of the column.",
    ]
    for noise in plan.noise_levels:
        lines += [
            "",
            f"## Noise level {noise:g}: test MSE, no fine-tuning",
            "",
            markdown_table(summary, "test_mse", plan.ratios, ".3e", _select(noise, False)),
        ]
    if plan.finetune_ratios:
        for noise in plan.noise_levels:
            lines += [
                "",
                f"## Noise level {noise:g}: test MSE after fine-tuning ({plan.finetune_steps} Adam steps, "
                "lr 1e-3, masks kept)",
                "",
                markdown_table(summary, "test_mse", plan.finetune_ratios, ".3e", _select(noise, True)),
            ]
    lines += [""] + runs.nonlinear_notes if runs.nonlinear_notes else []
    return lines


def run(args: argparse.Namespace) -> int:
    """Run the experiment; print the markdown tables and write CSV, markdown and PNG to ``args.out``."""
    limit_threads()
    started = time.perf_counter()
    plan = _plan(args)
    runs = _runs(args, plan)
    evaluate = make_evaluate(runs.test_x, runs.test_y)
    rows: list[dict[str, Any]] = []
    for noise in plan.noise_levels:
        for seed in range(args.seed, args.seed + plan.seeds):
            rows += runs.sweep(noise, seed, evaluate)
            logger.info("noise %g seed %d done after %.1f s", noise, seed, time.perf_counter() - started)
    summary = summarise(rows, ("noise", "method", "sparsity", "finetuned"), METRICS)

    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    write_csv(out / "diffusion_sorption_results.csv", rows)
    write_csv(out / "diffusion_sorption_summary.csv", summary)
    _plots(summary, out, plan)
    return finish_report(out / "diffusion_sorption_tables.md", _report_lines(args, runs, summary), started)
