"""``ecp-fast experiment regularized``: relevance-gated weight decay with iterative pruning on LeNets.

Reproduces the setting of Bonetta et al. (Applied Intelligence 2023) on MNIST: LeNet-300-100 and
LeNet-5 are trained and pruned step by step while the validation accuracy stays at or above a bound
(98.0% in the source), in three configurations:

* ``plain-magnitude``: plain training, global magnitude pruning;
* ``decay-magnitude``: relevance-gated weight decay, global magnitude pruning;
* ``decay-ecp``: relevance-gated weight decay, elimination-compensation pruning (ECP).

The validation split is carved from the training set; the test accuracy of the returned model is
reported too. Writes ``regularized_history.csv``, ``regularized_summary.csv``,
``regularized_table.md`` and one ``regularized_<network>.png`` per network to ``--out``.
"""

from __future__ import annotations

import argparse
import csv
import logging
import math
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from ecp_fast.apps.datasets import DATA_DIR_ENV, Split, check_mnist, load_digits_split, load_mnist
from ecp_fast.apps.experiments._common import check_counts, check_number
from ecp_fast.training.iterative import ECPPruneStep, IterativeResult, iterative_prune
from ecp_fast.training.regularize import RelevanceDecay, eligible_weights

logger = logging.getLogger(__name__)

NAME = "regularized"
HELP = "relevance-gated weight decay + iterative pruning (magnitude / ECP) on LeNet-300-100 and LeNet-5"

NETWORKS = ("lenet300", "lenet5")
CONFIGS = ("plain-magnitude", "decay-magnitude", "decay-ecp")
NETWORK_LABELS = {"lenet300": "LeNet-300-100", "lenet5": "LeNet-5"}


# ---- models --------------------------------------------------------------------------------------


class LeNet300(nn.Module):
    """LeNet-300-100: ``in -> 300 -> 100 -> classes`` with ReLU."""

    def __init__(self, in_features: int = 784, classes: int = 10) -> None:
        super().__init__()
        self.fc1 = nn.Linear(in_features, 300)
        self.fc2 = nn.Linear(300, 100)
        self.fc3 = nn.Linear(100, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits for a batch of images (any shape ``(N, ...)``)."""
        x = x.flatten(1)
        return self.fc3(F.relu(self.fc2(F.relu(self.fc1(x)))))


class LeNet5(nn.Module):
    """LeNet-5 (Caffe variant): conv 20 5x5, maxpool 2, conv 50 5x5, maxpool 2, fc 500, fc classes.

    For images smaller than 28x28 (the 8x8 digits) the convolutions get padding 2 so that the
    feature maps stay non-empty.
    """

    def __init__(self, image_size: int = 28, classes: int = 10) -> None:
        super().__init__()
        padding = 0 if image_size >= 16 else 2
        self.conv1 = nn.Conv2d(1, 20, 5, padding=padding)
        self.conv2 = nn.Conv2d(20, 50, 5, padding=padding)
        size = (image_size + 2 * padding - 4) // 2
        size = (size + 2 * padding - 4) // 2
        self.fc1 = nn.Linear(50 * size * size, 500)
        self.fc2 = nn.Linear(500, classes)
        self.image_size = image_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits for a batch of images ``(N, 1, H, W)`` (or flat ``(N, H*W)``)."""
        x = x.reshape(x.shape[0], 1, self.image_size, self.image_size)
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        return self.fc2(F.relu(self.fc1(x.flatten(1))))


def build_network(network: str, image_size: int) -> nn.Module:
    """The named network for square images of ``image_size`` pixels per side."""
    if network == "lenet300":
        return LeNet300(image_size * image_size)
    if network == "lenet5":
        return LeNet5(image_size)
    raise ValueError(f"unknown network {network!r}; expected one of {NETWORKS}")


# ---- data ----------------------------------------------------------------------------------------


class TensorBatches:
    """Re-iterable shuffled mini-batches of in-memory tensors (a new permutation every pass)."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, batch_size: int, seed: int) -> None:
        self.x, self.y, self.batch_size = x, y, batch_size
        self.generator = torch.Generator().manual_seed(seed)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        order = torch.randperm(len(self.x), generator=self.generator)
        for start in range(0, len(order), self.batch_size):
            index = order[start : start + self.batch_size]
            yield self.x[index], self.y[index]

    def __len__(self) -> int:
        return math.ceil(len(self.x) / self.batch_size)


@dataclass
class Data:
    """Training, validation (carved from training) and test tensors, and the image side length."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    image_size: int
    name: str


def load_data(args: argparse.Namespace) -> Data:
    """MNIST (normalised) or the sklearn digits, with a validation split carved from training."""
    if args.dataset == "digits":
        split: Split = load_digits_split(args.seed)
        image_size = 8
    else:
        split = load_mnist(args.data_dir, normalize=True)
        image_size = 28
    generator = torch.Generator().manual_seed(args.seed)
    order = torch.randperm(len(split.x_train), generator=generator)
    val_size = min(args.val_size, len(order) // 5)
    val_index, train_index = order[:val_size], order[val_size:]
    x_test, y_test = split.x_test, split.y_test
    if args.quick:
        train_index = train_index[: args.quick_train]
        x_test, y_test = x_test[: args.quick_train], y_test[: args.quick_train]
    return Data(
        split.x_train[train_index],
        split.y_train[train_index],
        split.x_train[val_index],
        split.y_train[val_index],
        x_test,
        y_test,
        image_size,
        args.dataset,
    )


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 2000) -> float:
    """Top-1 accuracy in percent."""
    model.eval()
    correct = 0
    for start in range(0, len(x), batch_size):
        correct += int((model(x[start : start + batch_size]).argmax(dim=1) == y[start : start + batch_size]).sum())
    return 100.0 * correct / max(len(x), 1)


# ---- one run -------------------------------------------------------------------------------------


@dataclass
class RunSettings:
    """Per-network training settings (after ``--quick`` and the network's defaults)."""

    interval: int
    train_subset: int | None
    val_subset: int | None
    prune_fraction: float
    max_steps: int
    time_limit_s: float | None


def network_settings(args: argparse.Namespace, network: str, train_size: int) -> RunSettings:
    """Interval, data subsets, pruning fraction and caps for one network.

    LeNet-5 costs about 20 times more CPU per step than LeNet-300-100, so it has its own interval,
    pruning fraction, validation subset and time limit (``--lenet5-*``).
    """
    lenet5 = network == "lenet5" and not args.quick
    subset = (args.lenet5_train_subset or None) if lenet5 else None
    effective = min(train_size, subset) if subset else train_size
    epoch = math.ceil(effective / args.batch_size)
    interval = args.interval or max(1, int(round(epoch * args.interval_epochs)))
    if lenet5 and args.lenet5_interval:
        interval = args.lenet5_interval
    fraction = args.lenet5_prune_fraction if lenet5 and args.lenet5_prune_fraction else args.prune_fraction
    max_steps = args.max_steps or interval * args.max_intervals
    limit = args.time_limit_lenet5 if network == "lenet5" else args.time_limit_lenet300
    val_subset = (args.lenet5_val_subset or None) if lenet5 else None
    return RunSettings(interval, subset, val_subset, fraction, max_steps, limit or None)


def _optimizer_and_scheduler(
    args: argparse.Namespace, model: nn.Module, interval: int
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR, str]:
    """The optimizer, its learning-rate schedule and when the schedule steps (``"step"`` or ``"interval"``)."""
    if args.optimizer == "sgd":
        optimizer: torch.optim.Optimizer = torch.optim.SGD(
            model.parameters(), lr=args.lr, momentum=args.momentum, nesterov=args.momentum > 0
        )
    else:
        optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    if args.lr_schedule == "cyclic":
        # Cosine from lr to lr * lr_floor within every interval, restarting at each interval (and so
        # at each pruning step): every evaluation sees a network settled at a small learning rate.
        def factor(t: int) -> float:
            return args.lr_floor + (1 - args.lr_floor) * 0.5 * (1 + math.cos(math.pi * (t % interval) / interval))

        scheduler_step = "step"
    else:
        # Per interval: lr * lr_decay^k, never below lr * lr_floor (pruned networks must still recover).
        def factor(t: int) -> float:
            return max(args.lr_decay**t, args.lr_floor)

        scheduler_step = "interval"
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, factor), scheduler_step


def _prune_step(
    args: argparse.Namespace, config: str, x_train: torch.Tensor, y_train: torch.Tensor, loss_fn: nn.Module
) -> ECPPruneStep | str:
    """ECP on the first calibration batches of the training set for the ``*ecp`` configs, else magnitude."""
    if not config.endswith("ecp"):
        return "magnitude"
    calibration = [
        (x_train[i : i + args.batch_size], y_train[i : i + args.batch_size])
        for i in range(0, min(len(x_train), args.calibration_batches * args.batch_size), args.batch_size)
    ]
    return ECPPruneStep(calibration, loss_fn, sensitivity=args.ecp_sensitivity, probes=args.probes, seed=args.seed)


def run_one(args: argparse.Namespace, data: Data, network: str, config: str) -> IterativeResult:
    """Train and iteratively prune one network in one configuration."""
    settings = network_settings(args, network, len(data.x_train))
    x_train, y_train = data.x_train, data.y_train
    if settings.train_subset:
        x_train, y_train = x_train[: settings.train_subset], y_train[: settings.train_subset]
    torch.manual_seed(args.seed)  # the same initial weights in every configuration
    model = build_network(network, data.image_size)
    batches = TensorBatches(x_train, y_train, args.batch_size, args.seed)
    optimizer, scheduler, scheduler_step = _optimizer_and_scheduler(args, model, settings.interval)
    loss_fn = nn.CrossEntropyLoss()
    regularizer = None
    if config.startswith("decay"):
        regularizer = RelevanceDecay(
            model,
            gamma=args.gamma,
            alpha=args.alpha,
            decay_steps=args.gamma_decay_steps if args.gamma_decay_steps is not None else settings.interval,
        )
    prune_step = _prune_step(args, config, x_train, y_train, loss_fn)
    x_val, y_val = data.x_val, data.y_val
    if settings.val_subset:
        x_val, y_val = x_val[: settings.val_subset], y_val[: settings.val_subset]

    def metric(m: nn.Module) -> float:
        return accuracy(m, x_val, y_val)

    return iterative_prune(
        model,
        batches,
        loss_fn,
        optimizer,
        metric,
        args.bound,
        interval=settings.interval,
        prune_fraction=settings.prune_fraction,
        prune_step=prune_step,
        regularizer=regularizer,
        scheduler=scheduler,
        scheduler_step=scheduler_step,
        recovery_intervals=args.recovery_intervals,
        backoff=args.backoff,
        warmup_intervals=args.warmup_intervals,
        max_steps=settings.max_steps,
        max_sparsity=args.max_sparsity,
        time_limit_s=settings.time_limit_s,
        progress=not args.no_progress,
        description=f"{network} {config}",
    )


# ---- reporting -----------------------------------------------------------------------------------


def write_outputs(out: Path, rows: list[dict], histories: dict[tuple[str, str], IterativeResult], bound: float) -> str:
    """CSV files, one PNG per network and the markdown table; returns the table."""
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "regularized_summary.csv", "w", newline="") as handle:
        summary_writer = csv.DictWriter(handle, fieldnames=list(rows[0].keys()))
        summary_writer.writeheader()
        summary_writer.writerows(rows)
    with open(out / "regularized_history.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["network", "config", "pruning_step", "step", "sparsity", "val_accuracy", "event"])
        for (network, config), result in histories.items():
            pruning_step = 0
            for entry in result.history:
                pruning_step += entry.event == "prune"
                writer.writerow(
                    [
                        network,
                        config,
                        pruning_step,
                        entry.step,
                        f"{entry.sparsity:.6f}",
                        f"{entry.metric:.4f}",
                        entry.event,
                    ]
                )
    table = markdown_table(rows)
    layers = ["| network | configuration | sparsity per layer |", "| --- | --- | --- |"]
    layers += [f"| {row['network']} | {row['config']} | {row['layer_sparsity']} |" for row in rows]
    (out / "regularized_table.md").write_text(table + "\n\n" + "\n".join(layers) + "\n")
    plot(out, histories, bound)
    return table


def markdown_table(rows: list[dict]) -> str:
    """The summary rows as a markdown table."""
    header = (
        "| network | configuration | sparsity reached | val acc (%) | test acc (%) | pruning steps "
        "| train steps | stop | time (s) |"
    )
    lines = [header, "|" + " --- |" * 9]
    for row in rows:
        rollbacks = f" ({row['rollbacks']} rollbacks)" if row.get("rollbacks") else ""
        lines.append(
            f"| {row['network']} | {row['config']} | {100 * row['sparsity']:.2f}% | {row['val_accuracy']:.2f} "
            f"| {row['test_accuracy']:.2f} | {row['prune_steps']} | {row['train_steps']} "
            f"| {row['stop_reason']}{rollbacks}"
            f"{'' if row['met_bound'] else ' (bound never met)'} | {row['seconds']:.0f} |"
        )
    return "\n".join(lines)


def plot(out: Path, histories: dict[tuple[str, str], IterativeResult], bound: float) -> None:
    """Per network: remaining weights (log scale) and validation accuracy against the pruning step.

    Every evaluation after a training interval is a point; several points at one pruning step are
    recovery intervals.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    for network in dict.fromkeys(network for network, _ in histories):
        fig, (ax_density, ax_metric) = plt.subplots(1, 2, figsize=(11, 4))
        for (net, config), result in histories.items():
            if net != network:
                continue
            xs, remaining, metrics = [], [], []
            pruning_step = 0
            for entry in result.history:
                pruning_step += entry.event == "prune"
                if entry.event == "train":
                    xs.append(pruning_step)
                    remaining.append(100 * (1 - entry.sparsity))
                    metrics.append(entry.metric)
            line = ax_density.plot(xs, remaining, marker="o", markersize=3, label=config)[0]
            ax_density.axhline(100 * (1 - result.sparsity), color=line.get_color(), linestyle=":", linewidth=1)
            ax_metric.plot(xs, metrics, marker="o", markersize=3, label=config)
        ax_metric.axhline(bound, color="black", linestyle="--", linewidth=1, label=f"bound {bound:g}%")
        ax_density.set_yscale("log")
        ax_density.set(
            xlabel="pruning step",
            ylabel="remaining weights (%) = 100 - sparsity",
            title=f"{NETWORK_LABELS[network]}: weights left (dotted: returned model)",
        )
        ax_metric.set(
            xlabel="pruning step",
            ylabel="validation accuracy (%)",
            title=f"{NETWORK_LABELS[network]}: accuracy after each interval",
        )
        ax_metric.set_ylim(max(0.0, bound - 3), 100)
        for ax in (ax_density, ax_metric):
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.grid(alpha=0.3, which="both")
            ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / f"regularized_{network}.png", dpi=110)
        plt.close(fig)


# ---- command line --------------------------------------------------------------------------------


def _add_training_options(parser: argparse.ArgumentParser) -> None:
    """Training: batches, optimizer, learning-rate schedule, threads, relevance decay."""
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--optimizer", choices=("adam", "sgd"), default="sgd")
    parser.add_argument("--lr", type=float, default=0.05, help="learning rate")
    parser.add_argument("--momentum", type=float, default=0.9, help="SGD (Nesterov) momentum")
    parser.add_argument(
        "--lr-schedule",
        choices=("cyclic", "decay"),
        default="cyclic",
        help="cyclic: cosine from --lr to --lr * --lr-floor within every interval; "
        "decay: --lr * --lr-decay^interval, floored at --lr * --lr-floor",
    )
    parser.add_argument("--lr-decay", type=float, default=0.85, help="learning-rate factor per interval (decay)")
    parser.add_argument("--lr-floor", type=float, default=0.02, help="lowest learning rate, as a fraction of --lr")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads (1 is fastest for these small networks on a shared CPU)",
    )
    parser.add_argument("--gamma", type=float, default=2e-3, help="relevance decay strength")
    parser.add_argument("--alpha", type=float, default=1e-3, help="relevance gate temperature")
    parser.add_argument(
        "--gamma-decay-steps",
        type=int,
        default=None,
        help="steps of linear gamma decay, restarted at each pruning step (default: interval)",
    )


def _add_pruning_options(parser: argparse.ArgumentParser) -> None:
    """Pruning: schedule, stopping, LeNet-5 budgets, ECP calibration."""
    parser.add_argument("--prune-fraction", type=float, default=0.2, help="fraction of remaining weights per step")
    parser.add_argument(
        "--interval", type=int, default=0, help="steps between pruning steps (0: from --interval-epochs)"
    )
    parser.add_argument("--interval-epochs", type=float, default=1.0, help="interval as a fraction of an epoch")
    parser.add_argument("--warmup-intervals", type=int, default=3, help="dense intervals before the first pruning")
    parser.add_argument("--recovery-intervals", type=int, default=3, help="intervals allowed below the bound")
    parser.add_argument(
        "--backoff",
        type=float,
        default=None,
        help="on a failed pruning step, roll back and multiply the fraction by this (default: stop)",
    )
    parser.add_argument("--max-intervals", type=int, default=45, help="cap on training intervals per run")
    parser.add_argument("--max-steps", type=int, default=0, help="cap on optimizer steps (0: from --max-intervals)")
    parser.add_argument("--max-sparsity", type=float, default=0.999)
    parser.add_argument(
        "--lenet5-train-subset",
        type=int,
        default=0,
        help="train LeNet-5 on the first N training samples only (0: all), for CPU time",
    )
    parser.add_argument(
        "--lenet5-interval",
        type=int,
        default=100,
        help="steps between pruning steps for LeNet-5 (0: as for LeNet-300-100)",
    )
    parser.add_argument(
        "--lenet5-prune-fraction",
        type=float,
        default=0.3,
        help="fraction pruned per step for LeNet-5 (0: --prune-fraction)",
    )
    parser.add_argument(
        "--lenet5-val-subset",
        type=int,
        default=2000,
        help="validate LeNet-5 on the first N validation samples only (0: all)",
    )
    parser.add_argument(
        "--time-limit-lenet300", type=float, default=200, help="seconds per LeNet-300-100 run (0: none)"
    )
    parser.add_argument("--time-limit-lenet5", type=float, default=330, help="seconds per LeNet-5 run (0: none)")
    parser.add_argument(
        "--ecp-sensitivity",
        "--ecp-criterion",
        dest="ecp_sensitivity",
        default="output",
        choices=("output", "loss", "local"),
        help="ECP sensitivity",
    )
    parser.add_argument("--probes", type=int, default=None, help="Rademacher probes for --ecp-sensitivity output")
    parser.add_argument("--calibration-batches", type=int, default=4, help="training batches ECP calibrates on")
    parser.add_argument("--quick-train", type=int, default=600, help="training samples in --quick mode")
    parser.add_argument("--no-progress", action="store_true", help="no tqdm bars")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``ecp-fast experiment regularized``."""
    parser.add_argument(
        "--data-dir",
        default=os.environ.get(DATA_DIR_ENV),
        help=f"folder with the MNIST IDX files (default: ${DATA_DIR_ENV})",
    )
    parser.add_argument(
        "--dataset",
        choices=("mnist", "digits"),
        default="mnist",
        help="mnist (28x28) or scikit-learn's bundled 8x8 digits for quick runs",
    )
    parser.add_argument("--out", default="runs/regularized", help="output folder for CSV, PNG and table")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--quick", action="store_true", help="tiny sizes (a few hundred samples, a few intervals): runs in seconds"
    )
    parser.add_argument("--networks", nargs="+", choices=NETWORKS, default=list(NETWORKS))
    parser.add_argument("--configs", nargs="+", choices=CONFIGS, default=list(CONFIGS))
    parser.add_argument("--bound", type=float, default=98.0, help="lowest acceptable validation accuracy (%%)")
    parser.add_argument("--val-size", type=int, default=5000, help="validation samples carved from training")
    _add_training_options(parser)
    _add_pruning_options(parser)


def _apply_quick(args: argparse.Namespace) -> None:
    """Tiny defaults for --quick, unless the user set them explicitly."""
    args.val_size = min(args.val_size, 300)
    args.interval = args.interval or 8
    args.max_intervals = min(args.max_intervals, 8)
    args.warmup_intervals = min(args.warmup_intervals, 1)
    args.recovery_intervals = min(args.recovery_intervals, 1)
    args.calibration_batches = min(args.calibration_batches, 2)
    args.batch_size = min(args.batch_size, 64)


def validate(args: argparse.Namespace) -> None:
    """Check every option and the MNIST files before the run (the command line calls it).

    Catches a bad value for the second network's run before the first one trains for minutes.
    """
    check_counts(
        args,
        {
            "val_size": 0,
            "batch_size": 1,
            "threads": 0,
            "gamma_decay_steps": 0,
            "interval": 0,
            "warmup_intervals": 0,
            "recovery_intervals": 0,
            "max_intervals": 1,
            "max_steps": 0,
            "lenet5_train_subset": 0,
            "lenet5_interval": 0,
            "lenet5_val_subset": 0,
            "probes": 1,
            "calibration_batches": 1,
            "quick_train": 1,
        },
    )
    check_number(args, "bound")
    for name in ("lr", "alpha", "interval_epochs", "lr_decay"):
        check_number(args, name, low=0.0)
    for name in ("momentum", "lr_floor", "gamma", "time_limit_lenet300", "time_limit_lenet5"):
        check_number(args, name, low=0.0, closed="low")
    check_number(args, "prune_fraction", low=0.0, high=1.0)
    check_number(args, "lenet5_prune_fraction", low=0.0, high=1.0, closed="low")
    check_number(args, "backoff", low=0.0, high=1.0)
    check_number(args, "max_sparsity", low=0.0, high=1.0, closed="high")
    if args.dataset == "mnist":
        check_mnist(args.data_dir)


def run(args: argparse.Namespace) -> int:
    """Run every requested network and configuration; write CSV, PNG and table to ``--out``."""
    if args.quick:
        _apply_quick(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    start = time.perf_counter()
    data = load_data(args)
    logger.info("data %s: %d train, %d val, %d test", data.name, len(data.x_train), len(data.x_val), len(data.x_test))
    rows: list[dict] = []
    histories: dict[tuple[str, str], IterativeResult] = {}
    for network in args.networks:
        for config in args.configs:
            result = run_one(args, data, network, config)
            settings = network_settings(args, network, len(data.x_train))
            test_acc = accuracy(result.model, data.x_test, data.y_test)
            per_layer = " / ".join(
                f"{ref.module_name} {100 * ref.count_zeros() / ref.numel():.1f}%"
                for ref in eligible_weights(result.model)
            )
            histories[(network, config)] = result
            rows.append(
                {
                    "network": network,
                    "config": config,
                    "sparsity": result.sparsity,
                    "val_accuracy": result.metric,
                    "test_accuracy": test_acc,
                    "met_bound": result.met_bound,
                    "prune_steps": result.prune_steps,
                    "rollbacks": result.rollbacks,
                    "train_steps": result.total_steps,
                    "checkpoint_step": result.step,
                    "stop_reason": result.stop_reason,
                    "seconds": result.seconds,
                    "interval": settings.interval,
                    "prune_fraction": settings.prune_fraction,
                    "layer_sparsity": per_layer,
                }
            )
            logger.info(
                "%s %s: sparsity %.4f val %.2f test %.2f (%s, %.0f s)",
                network,
                config,
                result.sparsity,
                result.metric,
                test_acc,
                result.stop_reason,
                result.seconds,
            )
    table = write_outputs(Path(args.out), rows, histories, args.bound)
    print(table)
    print(f"\n{data.name}; total {time.perf_counter() - start:.0f} s; outputs in {args.out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Stand-alone entry point (``python -m ecp_fast.apps.experiments.regularized``)."""
    parser = argparse.ArgumentParser(prog=f"ecp-fast experiment {NAME}", description=HELP)
    add_arguments(parser)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
