"""``ecp-fast experiment mnist``: every pruning method on LeNet-300-100 (784-300-100-10) trained on MNIST.

Per seed, a 784-300-100-10 ReLU MLP is trained (Adam, cross-entropy) on the standardised images,
calibrated on ``--calibration-samples`` training samples (sensitivity ``output``: exact Jacobian rows of
the 10 logits; the cross-entropy loss is passed so that the ``gradient`` and ``taylor`` baselines get
their loss gradients) and pruned globally to every ratio with every method, one-shot, plus ECP in
``--iterative-steps`` steps (recalibrated between steps). At ``--finetune-ratios`` each pruned copy
is also fine-tuned for ``--finetune-steps`` Adam steps with its masks kept.

The exact ``nonlinear`` baseline replays the network once per weight and Newton step, far too slow
for the 266,200 weights of the large network; it is compared, with all the other methods, on a small
network (``--small-hidden``) on 14x14 images (2x2 average pooling), calibrated on the first
``--nonlinear-samples`` calibration samples (the other methods of that comparison use the full
calibration set).

Writes to ``--out``: ``mnist_results.csv`` (every point and seed), ``mnist_summary.csv`` (mean and
standard deviation over seeds), ``mnist_tables.md`` (the tables printed on stdout), and the plots
``mnist_loss.png``, ``mnist_accuracy.png`` and ``mnist_small_loss.png``.
"""

from __future__ import annotations

import argparse
import itertools
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from ecp_fast.apps.datasets import DATA_DIR_ENV, Split, check_mnist, load_mnist
from ecp_fast.apps.errors import UsageError
from ecp_fast.apps.experiments._common import (
    DEFAULT_RATIOS,
    QUICK_RATIOS,
    RECONSTRUCTIVE_RUNS,
    SweepConfig,
    add_methods_option,
    batches_of,
    check_counts,
    finish_report,
    limit_threads,
    markdown_table,
    nonlinear_fits,
    parse_ratios,
    plot_panels,
    shuffled_batches,
    summarise,
    sweep,
    where,
    write_csv,
)
from ecp_fast.pruning.importance import IMPORTANCES
from ecp_fast.training.finetune import fit_classifier

logger = logging.getLogger(__name__)

NAME = "mnist"
HELP = "LeNet-300-100 on MNIST: test loss of every pruning method against the pruning ratio"

LARGE = "784-300-100-10"
METRICS = ("test_loss", "test_accuracy")


def make_mlp(sizes: tuple[int, ...]) -> nn.Sequential:
    """A ReLU MLP with the layer widths ``sizes`` (input first, logits last)."""
    layers: list[nn.Module] = []
    for index, (fan_in, fan_out) in enumerate(itertools.pairwise(sizes)):
        layers.append(nn.Linear(fan_in, fan_out))
        if index < len(sizes) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def pool_images(x: torch.Tensor) -> torch.Tensor:
    """Flattened 28x28 images -> flattened 14x14 images (2x2 average pooling)."""
    return F.avg_pool2d(x.reshape(-1, 1, 28, 28), 2).reshape(x.shape[0], -1)


def train(
    sizes: tuple[int, ...], x: torch.Tensor, y: torch.Tensor, epochs: int, seed: int, progress: bool
) -> nn.Sequential:
    """Adam (lr 1e-3) on shuffled batches of 128 for ``epochs``; deterministic for ``seed``."""
    torch.manual_seed(seed)
    return fit_classifier(
        make_mlp(sizes),
        x,
        y,
        epochs,
        lr=1e-3,
        seed=seed,
        progress=progress,
        description=f"train {'-'.join(map(str, sizes))} seed {seed}",
    )


def make_evaluate(x: torch.Tensor, y: torch.Tensor):  # noqa: ANN201 - a closure
    """``evaluate(model) -> {"test_loss", "test_accuracy"}`` on the given test set."""

    @torch.no_grad()
    def evaluate(model: nn.Module) -> dict[str, float]:
        model.eval()
        logits = model(x)
        return {
            "test_loss": float(F.cross_entropy(logits, y)),
            "test_accuracy": float((logits.argmax(dim=1) == y).float().mean()),
        }

    return evaluate


def load_data(data_dir: str | None, train_samples: int | None, test_samples: int | None) -> Split:
    """Standardised, flattened MNIST; optionally the first samples of each split only."""
    split = load_mnist(data_dir, normalize=True, flatten=True)
    if train_samples is None and test_samples is None:
        return split
    return Split(
        split.x_train[:train_samples],
        split.y_train[:train_samples],
        split.x_test[:test_samples],
        split.y_test[:test_samples],
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``ecp-fast experiment mnist``."""
    parser.add_argument(
        "--data-dir", default=None, help=f"folder with the four MNIST IDX files, gzip or raw (default: ${DATA_DIR_ENV})"
    )
    parser.add_argument("--out", type=Path, default=Path("runs/mnist"), help="output folder (default runs/mnist)")
    parser.add_argument("--seeds", type=int, default=3, help="networks trained per size and averaged (default 3)")
    parser.add_argument("--seed", type=int, default=0, help="first seed (default 0)")
    parser.add_argument("--epochs", type=int, default=8, help="training epochs of the large network (default 8)")
    parser.add_argument(
        "--ratios", default=DEFAULT_RATIOS, help=f"pruning ratios in percent (default {DEFAULT_RATIOS})"
    )
    parser.add_argument(
        "--calibration-samples", type=int, default=2048, help="training samples streamed for calibration (default 2048)"
    )
    parser.add_argument("--iterative-steps", type=int, default=5, help="steps of iterative ECP (default 5)")
    parser.add_argument(
        "--iterative-ratios",
        default="50,60,70,80,85,90,95",
        help="ratios at which iterative ECP runs (default 50,60,70,80,85,90,95)",
    )
    parser.add_argument(
        "--finetune-ratios",
        default="50,80,90,95",
        help="ratios at which the pruned networks are also fine-tuned (default 50,80,90,95)",
    )
    parser.add_argument(
        "--finetune-steps",
        type=int,
        default=50,
        help="Adam steps (batch 128, lr 1e-3) of each fine-tuning, masks kept (default 50)",
    )
    parser.add_argument(
        "--small-hidden",
        type=int,
        default=16,
        help="hidden width of the small 196-H-10 network of the nonlinear comparison (default 16)",
    )
    parser.add_argument("--small-epochs", type=int, default=3, help="training epochs of the small network (default 3)")
    parser.add_argument(
        "--nonlinear-samples",
        type=int,
        default=128,
        help="calibration samples of the exact nonlinear baseline (default 128)",
    )
    parser.add_argument("--no-small", action="store_true", help="skip the small-network comparison (no nonlinear)")
    add_methods_option(parser, "methods to run (default all; nonlinear only on the small network)")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="seconds: 1 seed, 2000/500 samples, 1 epoch, ratios 50 and 90, 256 calibration samples",
    )


def validate(args: argparse.Namespace) -> None:
    """Check every option and read the MNIST files through, before the run (the command line calls it).

    Raises :class:`~ecp_fast.apps.cli.UsageError`, ``FileNotFoundError`` or
    :class:`~ecp_fast.apps.datasets.DataFileError` naming the option or file; the ratios are
    checked under ``--quick`` too.
    """
    for name in ("ratios", "finetune_ratios", "iterative_ratios"):
        parse_ratios(getattr(args, name), option="--" + name.replace("_", "-"))
    check_counts(
        args,
        {
            "seeds": 1,
            "epochs": 0,
            "calibration_samples": 1,
            "iterative_steps": 0,
            "finetune_steps": 0,
            "small_hidden": 1,
            "small_epochs": 0,
            "nonlinear_samples": 1,
        },
    )
    check_mnist(args.data_dir)


@dataclass(frozen=True)
class _Plan:
    """The settings of one run, ``--quick`` applied."""

    quick: bool
    ratios: tuple[float, ...]
    finetune_ratios: tuple[float, ...]
    iterative_ratios: tuple[float, ...]
    seeds: int
    epochs: int
    small_epochs: int
    calibration_samples: int
    finetune_steps: int
    small_hidden: int
    nonlinear_samples: int
    requested: tuple[str, ...]

    @property
    def small_label(self) -> str:
        """The widths of the small network, ``196-H-10``."""
        return "-".join(map(str, (196, self.small_hidden, 10)))


def _plan(args: argparse.Namespace) -> _Plan:
    quick = bool(args.quick)
    ratios = QUICK_RATIOS if quick else parse_ratios(args.ratios)
    finetune_ratios = tuple(r for r in parse_ratios(args.finetune_ratios) if r in ratios) if not quick else (0.9,)
    iterative_ratios = tuple(r for r in parse_ratios(args.iterative_ratios) if r in ratios) if not quick else (0.9,)
    seeds = 1 if quick else args.seeds
    if seeds < 1:
        raise UsageError(f"--seeds must be at least 1, got {seeds}")
    return _Plan(
        quick=quick,
        ratios=ratios,
        finetune_ratios=finetune_ratios,
        iterative_ratios=iterative_ratios,
        seeds=seeds,
        epochs=1 if quick else args.epochs,
        small_epochs=2 if quick else args.small_epochs,
        calibration_samples=256 if quick else args.calibration_samples,
        finetune_steps=5 if quick else args.finetune_steps,
        small_hidden=8 if quick else args.small_hidden,
        nonlinear_samples=32 if quick else args.nonlinear_samples,
        requested=tuple(args.methods) if args.methods else (*IMPORTANCES, *RECONSTRUCTIVE_RUNS),
    )


@dataclass
class _Seeds:
    """The per-seed loop: the large network with every method, then the small one with nonlinear."""

    args: argparse.Namespace
    plan: _Plan
    data: Split
    progress: bool
    nonlinear_note: str = ""

    def large_config(self) -> SweepConfig:
        plan = self.plan
        return SweepConfig(
            methods=tuple(m for m in plan.requested if m != "nonlinear" and m in IMPORTANCES),
            sparsities=plan.ratios,
            iterative_steps=self.args.iterative_steps,
            iterative_sparsities=plan.iterative_ratios,
            sensitivity="output",
            finetune_sparsities=plan.finetune_ratios,
            finetune_steps=plan.finetune_steps,
            progress=self.progress,
            reconstructive=tuple(m for m in plan.requested if m in RECONSTRUCTIVE_RUNS),
        )

    def run(self, started: float) -> list[dict[str, Any]]:
        data, plan = self.data, self.plan
        config = self.large_config()
        loss_fn = nn.CrossEntropyLoss()
        evaluate = make_evaluate(data.x_test, data.y_test)
        small_x_train = pool_images(data.x_train)
        small_evaluate = make_evaluate(pool_images(data.x_test), data.y_test)
        rows: list[dict[str, Any]] = []
        for seed in range(self.args.seed, self.args.seed + plan.seeds):
            calibration_x, calibration_y = shuffled_batches(data.x_train, data.y_train, data.x_train.shape[0], seed)[0]
            calibration_x, calibration_y = (
                calibration_x[: plan.calibration_samples],
                calibration_y[: plan.calibration_samples],
            )
            finetune_batches = shuffled_batches(data.x_train, data.y_train, 128, seed + 1000)
            model = train((784, 300, 100, 10), data.x_train, data.y_train, plan.epochs, seed, self.progress)
            calibration = batches_of(calibration_x, calibration_y, 512)
            rows += sweep(model, config, calibration, loss_fn, evaluate, finetune_batches, seed, {"network": LARGE})
            logger.info("seed %d: large network done after %.1f s", seed, time.perf_counter() - started)
            if self.args.no_small:
                continue
            rows += self.small_rows(seed, small_x_train, calibration_x, calibration_y, loss_fn, small_evaluate)
            logger.info("seed %d: small network done after %.1f s", seed, time.perf_counter() - started)
        return rows

    def small_rows(
        self,
        seed: int,
        small_x_train: torch.Tensor,
        calibration_x: torch.Tensor,
        calibration_y: torch.Tensor,
        loss_fn: nn.Module,
        small_evaluate: Any,
    ) -> list[dict[str, Any]]:
        plan = self.plan
        small_sizes = (196, plan.small_hidden, 10)
        small_model = train(small_sizes, small_x_train, self.data.y_train, plan.small_epochs, seed, self.progress)
        small_calibration = batches_of(pool_images(calibration_x), calibration_y, 512)
        nonlinear_batches = batches_of(
            pool_images(calibration_x[: plan.nonlinear_samples]), calibration_y[: plan.nonlinear_samples], 512
        )
        small_methods = tuple(m for m in plan.requested if m in IMPORTANCES)  # the nonlinear comparison
        if "nonlinear" in plan.requested:
            reason = nonlinear_fits(small_model, nonlinear_batches)
            if reason is not None:
                small_methods = tuple(m for m in small_methods if m != "nonlinear")
                self.nonlinear_note = f"nonlinear skipped: {reason}"
                logger.warning(self.nonlinear_note)
        small_config = SweepConfig(
            methods=small_methods,
            sparsities=plan.ratios,
            iterative_steps=self.args.iterative_steps,
            iterative_sparsities=plan.iterative_ratios,
            sensitivity="output",
            progress=self.progress,
        )
        return sweep(
            small_model,
            small_config,
            small_calibration,
            loss_fn,
            small_evaluate,
            [],
            seed,
            {"network": plan.small_label},
            nonlinear_batches=nonlinear_batches,
        )


def _select(network: str, finetuned: bool) -> Callable[[dict[str, Any]], bool]:
    """The summary rows of ``network`` with or without fine-tuning (the dense row in both)."""
    return where("network", network, finetuned)


def _plots(summary: list[dict[str, Any]], out: Path, plan: _Plan, no_small: bool) -> None:
    panels = [
        ("no fine-tuning", _select(LARGE, False)),
        (f"fine-tuned {plan.finetune_steps} steps (masks kept)", _select(LARGE, True)),
    ]
    loss_label = "test cross-entropy (mean ± std over seeds)"
    title = f"MNIST {LARGE}, global pruning"
    plot_panels(summary, out / "mnist_loss.png", panels, "test_loss", loss_label, title)
    accuracy_label = "test accuracy (mean ± std over seeds)"
    plot_panels(summary, out / "mnist_accuracy.png", panels, "test_accuracy", accuracy_label, title, log_scale=False)
    if not no_small:
        plot_panels(
            summary,
            out / "mnist_small_loss.png",
            [("no fine-tuning", _select(plan.small_label, False))],
            "test_loss",
            loss_label,
            f"MNIST 14x14, {plan.small_label}, global pruning (nonlinear baseline included)",
        )


def _report_lines(
    args: argparse.Namespace, plan: _Plan, data: Split, summary: list[dict[str, Any]], nonlinear_note: str
) -> list[str]:
    ratios, finetune_ratios = plan.ratios, plan.finetune_ratios
    lines = [
        f"# MNIST: global pruning of {LARGE} (seeds {args.seed}..{args.seed + plan.seeds - 1}, mean ± std over seeds)",
        "",
        f"Training: {data.x_train.shape[0]} images, {plan.epochs} epoch(s) Adam lr 1e-3 batch 128; test: "
        f"{data.x_test.shape[0]} images. Calibration: {plan.calibration_samples} training samples, sensitivity "
        f"'output' (exact Jacobian rows of the 10 logits), cross-entropy for gradient/taylor. ecp-iterative: "
        f"{args.iterative_steps} steps, at ratios {', '.join(f'{r:.0%}' for r in plan.iterative_ratios)}. "
        "Bold: best mean of the column.",
        "",
        "## Test loss (cross-entropy), no fine-tuning",
        "",
        markdown_table(summary, "test_loss", ratios, ".4f", _select(LARGE, False)),
        "",
        "## Test accuracy, no fine-tuning",
        "",
        markdown_table(summary, "test_accuracy", ratios, ".4f", _select(LARGE, False)),
    ]
    if finetune_ratios:
        lines += [
            "",
            f"## Test loss after fine-tuning ({plan.finetune_steps} Adam steps, batch 128, lr 1e-3, masks kept)",
            "",
            markdown_table(summary, "test_loss", finetune_ratios, ".4f", _select(LARGE, True)),
            "",
            f"## Test accuracy after fine-tuning ({plan.finetune_steps} Adam steps)",
            "",
            markdown_table(summary, "test_accuracy", finetune_ratios, ".4f", _select(LARGE, True)),
        ]
    if not args.no_small:
        lines += [
            "",
            f"## Small network {plan.small_label} on 14x14 images (2x2 average pooling), nonlinear included, "
            "no fine-tuning: test loss",
            "",
            f"{plan.small_epochs} epoch(s) of training. nonlinear (the exact compensated error, one network replay "
            f"per weight and Newton step) is calibrated on the first {plan.nonlinear_samples} calibration samples; "
            f"it is too slow for the {LARGE} network. The other methods use all {plan.calibration_samples}.",
            "",
            markdown_table(summary, "test_loss", ratios, ".4f", _select(plan.small_label, False)),
        ]
        if nonlinear_note:
            lines += ["", nonlinear_note]
    return lines


def run(args: argparse.Namespace) -> int:
    """Run the experiment; print the markdown tables and write CSV, markdown and PNG to ``args.out``."""
    limit_threads()
    started = time.perf_counter()
    plan = _plan(args)
    try:
        data = load_data(args.data_dir, 2000 if plan.quick else None, 500 if plan.quick else None)
    except FileNotFoundError as error:
        raise UsageError(str(error)) from error
    progress = logger.getEffectiveLevel() <= logging.WARNING
    seeds = _Seeds(args, plan, data, progress)
    rows = seeds.run(started)
    summary = summarise(rows, ("network", "method", "sparsity", "finetuned"), METRICS)

    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    write_csv(out / "mnist_results.csv", rows)
    write_csv(out / "mnist_summary.csv", summary)
    _plots(summary, out, plan, args.no_small)
    return finish_report(
        out / "mnist_tables.md", _report_lines(args, plan, data, summary, seeds.nonlinear_note), started
    )
