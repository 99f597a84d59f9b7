"""``ecp-fast demo``: every pruning method on a small MLP trained on scikit-learn's digits.

The 8x8 digits ship with scikit-learn (no download). Features are standardised on a fixed
train/test split; a 64-32-10 ReLU MLP is trained per seed, calibrated on the training set (exact
Jacobian rows of the 10 logits, cross-entropy for the gradient baselines) and pruned one-shot to
each sparsity with every method, plus ECP in 5 iterative steps, and with the reconstructive methods
(``ecp-obs``, ``sparsegpt``) and the magnitude and wanda masks refit the same way. Test loss and accuracy (mean over
seeds) are printed as tables and written to ``results.csv`` (per seed), ``summary.csv`` (mean and
standard deviation) and ``loss_vs_sparsity.png`` in ``--out``. The exact ``nonlinear`` baseline
replays the network once per weight, so it is calibrated on the first ``--nonlinear-samples``
training samples only.
"""

from __future__ import annotations

import argparse
import copy
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from ecp_fast.apps.experiments._common import RECONSTRUCTIVE_RUNS, add_methods_option, check_counts, write_csv
from ecp_fast.pruning.importance import IMPORTANCES
from ecp_fast.pruning.pruner import Pruner
from ecp_fast.training.finetune import fit_classifier

logger = logging.getLogger(__name__)

HELP = "train a small MLP on the bundled digits and compare every pruning method"
SPARSITIES = (0.5, 0.7, 0.8, 0.9, 0.95)
QUICK_SPARSITIES = (0.5, 0.9)
ITERATIVE_STEPS = 5
METHOD_ORDER = ("ecp", "obd", "nonlinear", "wanda", "taylor", "gradient", "magnitude", "random")


@dataclass
class DigitsData:
    """Standardised digits on a fixed split (``random_state=0``, 30% test)."""

    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor


def load_digits_data() -> DigitsData:
    """The bundled 8x8 digits, standardised with the training split's mean and deviation."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split
    from sklearn.preprocessing import StandardScaler

    digits = load_digits()
    train_x, test_x, train_y, test_y = train_test_split(
        digits.data, digits.target, test_size=0.3, random_state=0, stratify=digits.target
    )
    scaler = StandardScaler().fit(train_x)
    return DigitsData(
        train_x=torch.tensor(scaler.transform(train_x), dtype=torch.float32),
        train_y=torch.tensor(train_y, dtype=torch.long),
        test_x=torch.tensor(scaler.transform(test_x), dtype=torch.float32),
        test_y=torch.tensor(test_y, dtype=torch.long),
    )


def make_mlp(hidden: int) -> nn.Sequential:
    """``64 -> hidden -> 10`` with ReLU."""
    return nn.Sequential(nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, 10))


def train_mlp(data: DigitsData, hidden: int, epochs: int, seed: int) -> nn.Sequential:
    """Adam (lr 1e-2) on shuffled batches of 128; deterministic for a seed."""
    torch.manual_seed(seed)
    return fit_classifier(make_mlp(hidden), data.train_x, data.train_y, epochs, lr=1e-2, seed=seed)


@torch.no_grad()
def evaluate(model: nn.Module, data: DigitsData) -> tuple[float, float]:
    """Test cross-entropy and accuracy."""
    model.eval()
    logits = model(data.test_x)
    loss = F.cross_entropy(logits, data.test_y).item()
    accuracy = (logits.argmax(dim=1) == data.test_y).float().mean().item()
    return loss, accuracy


def _batches(x: torch.Tensor, y: torch.Tensor, size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(x[start : start + size], y[start : start + size]) for start in range(0, x.shape[0], size)]


def run_seed(
    data: DigitsData,
    seed: int,
    sparsities: tuple[float, ...],
    methods: tuple[str, ...],
    hidden: int,
    epochs: int,
    nonlinear_samples: int,
) -> list[dict[str, Any]]:
    """Train one network and prune copies of it with every method and sparsity."""
    rows: list[dict[str, Any]] = []
    model = train_mlp(data, hidden, epochs, seed)
    dense_loss, dense_accuracy = evaluate(model, data)
    rows.append(_row("dense", 1, 0.0, seed, dense_loss, dense_accuracy, 0.0))
    calibration = _batches(data.train_x, data.train_y, 256)
    base = Pruner(copy.deepcopy(model), sensitivity="output", seed=seed, progress=False)
    base.calibrate(calibration, loss_fn=nn.CrossEntropyLoss())
    for method in methods:
        started = time.perf_counter()
        if method == "nonlinear":
            scorer = Pruner(copy.deepcopy(model), sensitivity="output", seed=seed, progress=False)
            scorer.calibrate(_batches(data.train_x[:nonlinear_samples], data.train_y[:nonlinear_samples], 256))
            scores = scorer.importances(method)
        elif method in RECONSTRUCTIVE_RUNS:
            continue
        else:
            scores = base.importances(method)
        for sparsity in sparsities:
            pruned = copy.deepcopy(model)
            Pruner(pruned, seed=seed, progress=False).prune(sparsity, method=method, importances=scores)
            loss, accuracy = evaluate(pruned, data)
            rows.append(_row(method, 1, sparsity, seed, loss, accuracy, time.perf_counter() - started))
    rows.extend(run_reconstructive(model, data, seed, sparsities, methods, calibration))
    if "ecp" in methods:
        for sparsity in sparsities:
            started = time.perf_counter()
            pruned = copy.deepcopy(model)
            pruner = Pruner(pruned, sensitivity="output", seed=seed, progress=False)
            pruner.calibrate(calibration)
            pruner.prune(sparsity, method="ecp", steps=ITERATIVE_STEPS)
            loss, accuracy = evaluate(pruned, data)
            rows.append(_row("ecp", ITERATIVE_STEPS, sparsity, seed, loss, accuracy, time.perf_counter() - started))
    return rows


def run_reconstructive(
    model: nn.Module,
    data: DigitsData,
    seed: int,
    sparsities: tuple[float, ...],
    methods: tuple[str, ...],
    calibration: list[tuple[torch.Tensor, torch.Tensor]],
) -> list[dict[str, Any]]:
    """Prune copies of ``model`` with every requested reconstructive run and sparsity."""
    rows = []
    for label in (label for label in RECONSTRUCTIVE_RUNS if label in methods):
        method, sensitivity, extra = RECONSTRUCTIVE_RUNS[label]
        for sparsity in sparsities:
            started = time.perf_counter()
            pruned = copy.deepcopy(model)
            pruner = Pruner(pruned, sensitivity=sensitivity or "output", seed=seed, progress=False)
            pruner.calibrate(calibration, loss_fn=nn.CrossEntropyLoss())
            pruner.prune(sparsity, method=method, **extra)
            loss, accuracy = evaluate(pruned, data)
            rows.append(_row(label, 1, sparsity, seed, loss, accuracy, time.perf_counter() - started))
    return rows


def _row(
    method: str, steps: int, sparsity: float, seed: int, loss: float, accuracy: float, seconds: float
) -> dict[str, Any]:
    return {
        "method": method,
        "steps": steps,
        "sparsity": sparsity,
        "seed": seed,
        "test_loss": loss,
        "test_accuracy": accuracy,
        "seconds": seconds,
    }


def _label(method: str, steps: int) -> str:
    return method if steps == 1 else f"{method} (steps={steps})"


def summarise(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean and standard deviation over seeds per (method, steps, sparsity)."""
    groups: dict[tuple[str, int, float], list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault((row["method"], row["steps"], row["sparsity"]), []).append(row)
    summary = []
    for (method, steps, sparsity), members in groups.items():
        losses = np.array([member["test_loss"] for member in members])
        accuracies = np.array([member["test_accuracy"] for member in members])
        summary.append(
            {
                "method": _label(method, steps),
                "sparsity": sparsity,
                "seeds": len(members),
                "test_loss_mean": float(losses.mean()),
                "test_loss_std": float(losses.std()),
                "test_accuracy_mean": float(accuracies.mean()),
                "test_accuracy_std": float(accuracies.std()),
            }
        )
    return summary


def format_table(summary: list[dict[str, Any]], value: str, sparsities: tuple[float, ...], fmt: str) -> str:
    """A method x sparsity table of ``value`` (``test_loss_mean`` or ``test_accuracy_mean``)."""
    labels: list[str] = []
    for entry in summary:
        if entry["method"] not in labels:
            labels.append(entry["method"])
    lookup = {(entry["method"], entry["sparsity"]): entry[value] for entry in summary}
    width = max(len(label) for label in labels)
    header = f"{'method':<{width}}  " + "  ".join(f"{f'{s:.0%}':>8}" for s in sparsities)
    lines = [header]
    for label in labels:
        cells = []
        for sparsity in sparsities:
            cell = lookup.get((label, sparsity))
            cells.append(f"{format(cell, fmt):>8}" if cell is not None else f"{'-':>8}")
        lines.append(f"{label:<{width}}  " + "  ".join(cells))
    return "\n".join(lines)


def plot(summary: list[dict[str, Any]], path: Path, sparsities: tuple[float, ...]) -> None:
    """Test loss against sparsity, one line per method (log scale)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 4.5))
    labels: list[str] = []
    for entry in summary:
        if entry["method"] not in labels and entry["method"] != "dense":
            labels.append(entry["method"])
    for label in labels:
        points = sorted((e["sparsity"], e["test_loss_mean"]) for e in summary if e["method"] == label)
        axis.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=label)
    dense = [e["test_loss_mean"] for e in summary if e["method"] == "dense"]
    if dense:
        axis.axhline(dense[0], color="black", linestyle="--", linewidth=1, label="dense")
    axis.set_yscale("log")
    axis.set_xlabel("sparsity")
    axis.set_ylabel("test cross-entropy (mean over seeds)")
    axis.set_title("Digits MLP: one-shot pruning without fine-tuning")
    axis.set_xticks(list(sparsities))
    axis.grid(True, which="both", alpha=0.3)
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``ecp-fast demo``."""
    parser.add_argument("--out", type=Path, default=Path("runs/demo"), help="output folder (default runs/demo)")
    parser.add_argument("--seeds", type=int, default=3, help="networks trained and averaged (default 3)")
    parser.add_argument("--seed", type=int, default=0, help="first seed (default 0)")
    parser.add_argument("--hidden", type=int, default=32, help="hidden width of the MLP (default 32)")
    parser.add_argument("--epochs", type=int, default=60, help="training epochs (default 60)")
    parser.add_argument(
        "--nonlinear-samples", type=int, default=256, help="calibration samples of the exact nonlinear baseline"
    )
    add_methods_option(parser, "methods to run (default all)")
    parser.add_argument("--quick", action="store_true", help="a tiny run in seconds (1 seed, 2 sparsities, 8 hidden)")


def validate(args: argparse.Namespace) -> None:
    """Check the counts before the run (the command line calls it); ``UsageError`` naming the option.

    Checked under ``--quick`` too, which replaces them: a bad value is a mistake either way.
    """
    check_counts(args, {"seeds": 1, "hidden": 1, "epochs": 0, "nonlinear_samples": 1})


def run(args: argparse.Namespace) -> int:
    """Run the demo; print the tables and write CSV and PNG to ``args.out``."""
    # The network is tiny: one thread avoids the OpenMP spin-wait that dominates small kernels.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _run(args)
    finally:
        torch.set_num_threads(threads)


def _run(args: argparse.Namespace) -> int:
    sparsities = QUICK_SPARSITIES if args.quick else SPARSITIES
    seeds = 1 if args.quick else args.seeds
    hidden = 8 if args.quick else args.hidden
    epochs = 10 if args.quick else args.epochs
    nonlinear_samples = 64 if args.quick else args.nonlinear_samples
    validate(args)  # again here: run() may be called without the command line's checks
    requested = tuple(args.methods) if args.methods else (*RECONSTRUCTIVE_RUNS, *IMPORTANCES)
    order = (*RECONSTRUCTIVE_RUNS, *METHOD_ORDER)
    methods = tuple(m for m in order if m in requested) + tuple(m for m in requested if m not in order)
    started = time.perf_counter()
    data = load_digits_data()
    rows: list[dict[str, Any]] = []
    for seed in range(args.seed, args.seed + seeds):
        rows.extend(run_seed(data, seed, sparsities, methods, hidden, epochs, nonlinear_samples))
        logger.info("seed %d done after %.1f s", seed, time.perf_counter() - started)
    summary = summarise(rows)
    args.out.mkdir(parents=True, exist_ok=True)
    write_csv(args.out / "results.csv", rows)
    write_csv(args.out / "summary.csv", summary)
    plot(summary, args.out / "loss_vs_sparsity.png", sparsities)
    columns = (0.0,) + sparsities
    print(f"Digits MLP 64-{hidden}-10, {seeds} seed(s), test set {data.test_x.shape[0]} samples, no fine-tuning")
    print(f"nonlinear: exact compensated error, calibrated on the first {nonlinear_samples} training samples\n")
    print("test loss (cross-entropy, mean over seeds)")
    print(format_table(summary, "test_loss_mean", columns, ".4f"))
    print("\ntest accuracy (mean over seeds)")
    print(format_table(summary, "test_accuracy_mean", columns, ".4f"))
    print(f"\nwrote {args.out / 'results.csv'}, {args.out / 'summary.csv'}, {args.out / 'loss_vs_sparsity.png'}")
    print(f"({time.perf_counter() - started:.1f} s)")
    return 0
