"""Shared machinery of the ``mnist`` and ``diffusion-sorption`` experiments.

One trained network is pruned on copies with every method at every sparsity (scores computed once
per method and reused), ECP is also run iteratively, and the pruned copies are optionally fine-tuned
with their masks kept. Every point becomes one row; rows are summarised over seeds (mean and
population standard deviation), written as CSV, markdown tables and matplotlib plots.
"""

from __future__ import annotations

import argparse
import copy
import csv
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from ecp_fast.apps.errors import UsageError
from ecp_fast.pruning.importance import IMPORTANCES, Importance, check_nonlinear_size
from ecp_fast.pruning.pruner import Pruner
from ecp_fast.training.finetune import finetune

logger = logging.getLogger(__name__)

#: Reconstructive runs: label -> (method, sensitivity, extra prune() arguments). The refit baselines
#: are mask methods with the same sequential refit and allocation search as ecp-obs.
RECONSTRUCTIVE_RUNS: dict[str, tuple[str, str | None, dict[str, Any]]] = {
    "ecp-obs": ("ecp-obs", None, {}),
    "sparsegpt": ("sparsegpt", "local", {}),
    "magnitude+refit": ("magnitude", None, {"reconstruct": True, "allocation": "search"}),
    "wanda+refit": ("wanda", None, {"reconstruct": True, "allocation": "search"}),
}

#: Order in which methods appear in tables and plots.
METHOD_ORDER = (
    "ecp-obs",
    "sparsegpt",
    "magnitude+refit",
    "wanda+refit",
    "ecp",
    "ecp-iterative",
    "nonlinear",
    "obd",
    "wanda",
    "taylor",
    "gradient",
    "magnitude",
    "random",
)

#: Pruning ratios of the sweeps (percent, ``--ratios``) and of their ``--quick`` runs.
DEFAULT_RATIOS = "10,20,30,40,50,60,70,80,85,90,95"
QUICK_RATIOS = (0.5, 0.9)

Batches = list[tuple[torch.Tensor, torch.Tensor]]
Evaluate = Callable[[nn.Module], dict[str, float]]


@dataclass
class SweepConfig:
    """What one pruning sweep of one trained network does.

    Attributes:
        methods: pruner methods scored one-shot (``nonlinear`` is scored on ``nonlinear_batches``).
        sparsities: global pruning ratios.
        iterative_steps: steps of the iterative ECP run (0 or 1 disables it).
        iterative_sparsities: ratios of the iterative ECP run (None: all of ``sparsities``).
        sensitivity: sensitivity sensitivity of the pruner (``"output"``).
        probes: Rademacher probes, or None for exact Jacobian rows (up to 32 outputs).
        finetune_sparsities: ratios at which the pruned copies are also fine-tuned (empty: none).
        finetune_steps: optimiser steps of each fine-tuning.
        finetune_lr: Adam learning rate of the fine-tuning.
        progress: show tqdm progress bars.
        reconstructive: labels of :data:`RECONSTRUCTIVE_RUNS` pruned at every ratio.
    """

    methods: Sequence[str]
    sparsities: Sequence[float]
    iterative_steps: int = 5
    iterative_sparsities: Sequence[float] | None = None
    sensitivity: str = "output"
    probes: int | None = None
    finetune_sparsities: Sequence[float] = field(default_factory=tuple)
    finetune_steps: int = 0
    finetune_lr: float = 1e-3
    progress: bool = True
    reconstructive: Sequence[str] = field(default_factory=tuple)


def batches_of(x: torch.Tensor, y: torch.Tensor, size: int) -> Batches:
    """Consecutive ``(inputs, targets)`` batches of ``size`` (a re-iterable list)."""
    return [(x[start : start + size], y[start : start + size]) for start in range(0, x.shape[0], size)]


def shuffled_batches(x: torch.Tensor, y: torch.Tensor, size: int, seed: int) -> Batches:
    """Batches of a fixed random permutation of the samples (deterministic for ``seed``)."""
    order = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(seed))
    return batches_of(x[order], y[order], size)


def nonlinear_fits(model: nn.Module, batches: Batches) -> str | None:
    """None when the exact ``nonlinear`` baseline accepts ``model`` calibrated on ``batches``, else why not."""
    probe = Pruner(copy.deepcopy(model), progress=False)
    probe.calibrate(batches)
    try:
        check_nonlinear_size(probe.layers, probe.calibration)
    except ValueError as error:
        return str(error)
    return None


def _label(method: str, steps: int) -> str:
    return method if steps <= 1 else f"{method}-iterative"


def sweep(
    model: nn.Module,
    config: SweepConfig,
    calibration: Batches,
    loss_fn: nn.Module,
    evaluate: Evaluate,
    finetune_batches: Batches,
    seed: int,
    context: dict[str, Any],
    *,
    nonlinear_batches: Batches | None = None,
) -> list[dict[str, Any]]:
    """Prune copies of the trained ``model`` with every method and sparsity; one row per point.

    ``calibration`` feeds every method but ``nonlinear`` (``loss_fn`` is passed so that the
    ``gradient`` and ``taylor`` baselines get their loss gradients); ``nonlinear_batches`` (a small
    subset) feeds ``nonlinear``. ``context`` (network, noise level, ...) is copied into every row.
    """
    run = _Sweep(model, config, calibration, loss_fn, evaluate, finetune_batches, seed, context, nonlinear_batches)
    rows: list[dict[str, Any]] = []
    dense_metrics = evaluate(model)
    rows.append(_row(context, "dense", 1, 0.0, False, seed, dense_metrics, 0.0))
    base = run.pruner(copy.deepcopy(model))
    base.calibrate(calibration, loss_fn=loss_fn)
    jobs: list[tuple[str, int]] = [(method, 1) for method in config.methods]
    if "ecp" in config.methods and config.iterative_steps > 1:
        jobs.append(("ecp", config.iterative_steps))
    jobs.extend((label, 1) for label in config.reconstructive)
    iterative = config.sparsities if config.iterative_sparsities is None else config.iterative_sparsities
    total = sum(len(config.sparsities if steps == 1 else iterative) for _, steps in jobs)
    bar = tqdm(total=total, desc=f"prune seed {seed} {_describe(context)}", disable=not config.progress, leave=False)
    for method, steps in jobs:
        scores = run.scores(base, method, steps)
        for sparsity in config.sparsities if steps == 1 else iterative:
            rows += run.point(method, steps, sparsity, scores)
            bar.update(1)
    bar.close()
    return rows


@dataclass(frozen=True)
class _Sweep:
    """The arguments of one :func:`sweep`, shared by its scoring and its pruning points."""

    model: nn.Module
    config: SweepConfig
    calibration: Batches
    loss_fn: nn.Module
    evaluate: Evaluate
    finetune_batches: Batches
    seed: int
    context: dict[str, Any]
    nonlinear_batches: Batches | None

    def pruner(self, model: nn.Module) -> Pruner:
        config = self.config
        return Pruner(model, sensitivity=config.sensitivity, probes=config.probes, seed=self.seed, progress=False)

    def scores(self, base: Pruner, method: str, steps: int) -> dict[str, Importance] | None:
        """One-shot importances of ``method`` (None: the method is calibrated and pruned per point)."""
        if method in RECONSTRUCTIVE_RUNS or steps != 1:
            return None
        started = time.perf_counter()
        if method == "nonlinear":
            if self.nonlinear_batches is None:
                raise ValueError("method 'nonlinear' needs nonlinear_batches (a small calibration subset)")
            scorer = self.pruner(copy.deepcopy(self.model))
            scorer.calibrate(self.nonlinear_batches)
            scores = scorer.importances("nonlinear")
        else:
            scores = base.importances(method)
        logger.info("scored %s in %.1f s", method, time.perf_counter() - started)
        return scores

    def point(
        self, method: str, steps: int, sparsity: float, scores: dict[str, Importance] | None
    ) -> list[dict[str, Any]]:
        """Prune a copy to ``sparsity``: its row, and a fine-tuned row at the fine-tuning ratios."""
        config, context, seed = self.config, self.context, self.seed
        point_started = time.perf_counter()
        pruned = copy.deepcopy(self.model)
        pruner = self.pruner(pruned)
        if method in RECONSTRUCTIVE_RUNS:
            _prune_reconstructive(pruned, method, sparsity, config, self.calibration, self.loss_fn, seed)
        elif scores is not None:
            pruner.prune(sparsity, method=method, importances=scores)
        else:
            pruner.calibrate(self.calibration)
            pruner.prune(sparsity, method=method, steps=steps)
        seconds = time.perf_counter() - point_started
        label = _label(method, steps)
        rows = [_row(context, label, steps, sparsity, False, seed, self.evaluate(pruned), seconds)]
        if sparsity in config.finetune_sparsities and config.finetune_steps > 0:
            finetune(
                pruned,
                self.finetune_batches,
                self.loss_fn,
                steps=config.finetune_steps,
                lr=config.finetune_lr,
                progress=False,
            )
            metrics = self.evaluate(pruned)
            rows.append(_row(context, label, steps, sparsity, True, seed, metrics, time.perf_counter() - point_started))
        return rows


def _prune_reconstructive(
    model: nn.Module,
    label: str,
    sparsity: float,
    config: SweepConfig,
    calibration: Batches,
    loss_fn: nn.Module,
    seed: int,
) -> None:
    """One reconstructive run of :data:`RECONSTRUCTIVE_RUNS` on ``model`` (in place)."""
    method, sensitivity, extra = RECONSTRUCTIVE_RUNS[label]
    pruner = Pruner(
        model, sensitivity=sensitivity or config.sensitivity, probes=config.probes, seed=seed, progress=False
    )
    pruner.calibrate(calibration, loss_fn=loss_fn)
    pruner.prune(sparsity, method=method, **extra)


def _describe(context: dict[str, Any]) -> str:
    return " ".join(f"{key}={value}" for key, value in context.items())


def _row(
    context: dict[str, Any],
    method: str,
    steps: int,
    sparsity: float,
    finetuned: bool,
    seed: int,
    metrics: dict[str, float],
    seconds: float,
) -> dict[str, Any]:
    return {
        **context,
        "method": method,
        "steps": steps,
        "sparsity": sparsity,
        "finetuned": int(finetuned),
        "seed": seed,
        **metrics,
        "seconds": round(seconds, 3),
    }


def summarise(rows: list[dict[str, Any]], keys: Sequence[str], metrics: Sequence[str]) -> list[dict[str, Any]]:
    """Mean and standard deviation over seeds of ``metrics`` per distinct value of ``keys``."""
    groups: dict[tuple[Any, ...], list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault(tuple(row[key] for key in keys), []).append(row)
    summary = []
    for group_key, members in groups.items():
        entry: dict[str, Any] = dict(zip(keys, group_key, strict=True))
        entry["seeds"] = len(members)
        for metric in metrics:
            values = np.array([member[metric] for member in members], dtype=np.float64)
            entry[f"{metric}_mean"] = float(values.mean())
            entry[f"{metric}_std"] = float(values.std())
        summary.append(entry)
    return summary


def ordered_methods(labels: Sequence[str]) -> list[str]:
    """``labels`` without duplicates, ``dense`` first, then :data:`METHOD_ORDER`, then the rest."""
    unique = list(dict.fromkeys(labels))
    known = [m for m in ("dense",) + METHOD_ORDER if m in unique]
    return known + [m for m in unique if m not in known]


def markdown_table(
    summary: list[dict[str, Any]],
    metric: str,
    sparsities: Sequence[float],
    fmt: str,
    where: Callable[[dict[str, Any]], bool],
) -> str:
    """A markdown method x sparsity table of ``metric`` as ``mean ± std`` over the entries ``where`` selects.

    The dense network appears in the 0% column; the lowest mean of each column is in bold.
    """
    selected = [entry for entry in summary if where(entry)]
    methods = ordered_methods([entry["method"] for entry in selected])
    lookup = {(entry["method"], entry["sparsity"]): entry for entry in selected}
    columns = [0.0] + list(sparsities)
    lower_is_better = "accuracy" not in metric
    best: dict[float, float] = {}
    for sparsity in sparsities:
        values = [lookup[(m, sparsity)][f"{metric}_mean"] for m in methods if (m, sparsity) in lookup]
        if values:
            best[sparsity] = min(values) if lower_is_better else max(values)
    header = "| method | " + " | ".join(f"{s:.0%}" for s in columns) + " |"
    lines = [header, "| --- |" + " --- |" * len(columns)]
    for method in methods:
        cells = []
        for sparsity in columns:
            entry = lookup.get((method, sparsity))
            if entry is None:
                cells.append("")
                continue
            mean, std = entry[f"{metric}_mean"], entry[f"{metric}_std"]
            text = f"{format(mean, fmt)} ± {format(std, fmt)}"
            if sparsity in best and mean == best[sparsity]:
                text = f"**{text}**"
            cells.append(text)
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_panels(
    summary: list[dict[str, Any]],
    path: Path,
    panels: Sequence[tuple[str, Callable[[dict[str, Any]], bool]]],
    metric: str,
    ylabel: str,
    title: str,
    log_scale: bool = True,
) -> None:
    """One panel per ``(title, selector)``: ``metric`` (mean, std as a band) against sparsity per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, len(panels), figsize=(6.0 * len(panels), 4.5), squeeze=False)
    for axis, (panel_title, where) in zip(axes[0], panels, strict=True):
        selected = [entry for entry in summary if where(entry)]
        for method in ordered_methods([entry["method"] for entry in selected]):
            if method == "dense":
                dense = [e[f"{metric}_mean"] for e in selected if e["method"] == "dense"]
                axis.axhline(dense[0], color="black", linestyle="--", linewidth=1, label="dense")
                continue
            points = sorted(
                (e["sparsity"], e[f"{metric}_mean"], e[f"{metric}_std"]) for e in selected if e["method"] == method
            )
            xs = np.array([p[0] for p in points])
            means = np.array([p[1] for p in points])
            stds = np.array([p[2] for p in points])
            line = axis.plot(xs, means, marker="o", markersize=3, label=method)[0]
            axis.fill_between(xs, np.maximum(means - stds, 1e-12), means + stds, color=line.get_color(), alpha=0.15)
        if log_scale:
            axis.set_yscale("log")
        axis.set_xlabel("pruning ratio (global)")
        axis.set_ylabel(ylabel)
        axis.set_title(panel_title, fontsize=10)
        axis.grid(True, which="both", alpha=0.3)
        axis.legend(fontsize=7)
    figure.suptitle(title, fontsize=11)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)


def where(key: str, value: Any, finetuned: bool) -> Callable[[dict[str, Any]], bool]:
    """The summary rows with ``row[key] == value``, fine-tuned or not (the dense row in both)."""
    return lambda row: row[key] == value and (row["finetuned"] == int(finetuned) or row["method"] == "dense")


def finish_report(path: Path, lines: list[str], started: float) -> int:
    """Add the wall time since ``started``, write the report to ``path``, print it; the exit status 0."""
    report = "\n".join([*lines, "", f"Wall time: {time.perf_counter() - started:.0f} s"])
    path.write_text(report + "\n")
    print(report)
    return 0


def add_methods_option(parser: argparse.ArgumentParser, help_text: str) -> None:
    """``--methods``: any of the importances and of :data:`RECONSTRUCTIVE_RUNS`."""
    parser.add_argument(
        "--methods",
        nargs="+",
        default=None,
        choices=sorted(IMPORTANCES) + sorted(RECONSTRUCTIVE_RUNS),
        help=help_text,
    )


def write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    """Write dict rows (the union of their keys as header, in first-seen order)."""
    fieldnames = list(dict.fromkeys(key for row in rows for key in row))
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fieldnames)
        writer.writeheader()
        writer.writerows(rows)


def _option(name: str) -> str:
    return "--" + name.replace("_", "-")


def parse_ratios(text: str, option: str = "--ratios") -> tuple[float, ...]:
    """``"10,20,50"`` (percent) or ``"0.1,0.2"`` (fractions) as a sorted tuple of fractions in (0, 1).

    Raises :class:`~ecp_fast.apps.cli.UsageError` (a ``ValueError``) naming ``option`` for anything else.
    """
    expected = f"{option}: pruning ratios must be comma-separated numbers in (0, 100) percent (e.g. 10,50,90)"
    if not isinstance(text, str):
        raise UsageError(f"{expected}, got {text!r}")
    try:
        values = [float(part) for part in text.split(",") if part.strip()]
    except ValueError as error:
        raise UsageError(f"{expected}, got {text!r}") from error
    if not values:
        raise UsageError(f"{expected}, got {text!r}")
    fractions = tuple(sorted(v / 100.0 if v >= 1.0 else v for v in values))
    for value in fractions:
        if not 0.0 < value < 1.0:  # also NaN
            raise UsageError(f"{expected}, got {text!r}")
    return fractions


def parse_numbers(text: str, option: str, kind: type, minimum: float) -> tuple[Any, ...]:
    """Comma-separated ``kind`` values (``int`` or ``float``), each finite and at least ``minimum``."""
    expected = f"{option} must be comma-separated {'integers' if kind is int else 'numbers'} >= {minimum:g}"
    try:
        values = tuple(kind(part) for part in str(text).split(",") if part.strip())
    except ValueError as error:
        raise UsageError(f"{expected}, got {text!r}") from error
    if any(not np.isfinite(value) or value < minimum for value in values):
        raise UsageError(f"{expected}, got {text!r}")
    return values


def check_counts(args: argparse.Namespace, minimums: dict[str, int]) -> None:
    """Every integer option in ``minimums`` (attribute -> least value) is at least that value (None allowed)."""
    for name, minimum in minimums.items():
        value = getattr(args, name)
        if value is not None and value < minimum:
            raise UsageError(f"{_option(name)} must be an integer >= {minimum}, got {value}")


def check_number(
    args: argparse.Namespace, name: str, low: float | None = None, high: float | None = None, closed: str = ""
) -> None:
    """A float option is finite and in ``low..high`` (ends open unless named in ``closed``: "low", "high")."""
    value = getattr(args, name)
    if value is None:
        return
    bad = not np.isfinite(value)
    bad = bad or (low is not None and (value < low or (value == low and "low" not in closed)))
    bad = bad or (high is not None and (value > high or (value == high and "high" not in closed)))
    if bad:
        left, right = ("[" if "low" in closed else "("), ("]" if "high" in closed else ")")
        interval = f" in {left}{low if low is not None else '-inf'}, {high if high is not None else 'inf'}{right}"
        raise UsageError(f"{_option(name)} must be a finite number{interval}, got {value}")


def limit_threads(threads: int = 1) -> None:
    """Run torch on ``threads`` threads (default 1).

    The networks here are small: on a shared two-core machine one thread was measured about ten
    times faster per training step than two, which contend with every other process.
    """
    torch.set_num_threads(max(1, threads))
