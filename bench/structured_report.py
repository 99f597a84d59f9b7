"""Prints the figures of docs/structured.md as markdown tables and writes docs/results/structured_*.csv.

Run: ``nice -n 10 .venv/bin/python bench/structured_report.py`` (a few minutes on 2 cores; needs the
MNIST IDX files in ``--mnist`` or ``$ECP_DATA_DIR``; ``--skip-mnist`` runs without them).

1. Speed: inference of the 784-300-100-10 ReLU MLP, dense and with 25/50/75% of the hidden units of
   each layer removed (``scope="layer"``), batch 1 and 256, under ``torch.inference_mode``. The
   contenders are timed interleaved, each round timing a burst of calls per model; the figure is
   the minimum over rounds (a busy machine slows every contender alike, the minimum is the least
   disturbed). Then the 2:4 question on CPU: a dense Linear, the same Linear with a 2:4-masked
   dense weight, and a CSR sparse weight.
2. Quality: every structured sensitivity at 25/50/75% on an MLP trained on MNIST and on the digits
   demo MLP, test loss and accuracy without and after a short fine-tuning (``ecp_fast.training.finetune``).

Timing, the machine line and the speed CSVs (``structured_speed.csv``, ``structured_2to4_cpu.csv``: the
harness's row schema, the settings of each row in ``extra``) come from ``bench/harness.py``;
``structured_quality.csv`` has one column per figure.
"""

from __future__ import annotations

import argparse
import copy
import logging
import os
import warnings
from functools import partial
from pathlib import Path
from typing import Any

import torch
from harness import Row, interleaved_times, machine_info, machine_line, markdown, timing_row, write_csv
from torch import nn
from torch.nn import functional as F

from ecp_fast import Pruner, finetune
from ecp_fast.apps.experiments._common import write_csv as write_dict_csv
from ecp_fast.pruning.structured import prune_neurons
from ecp_fast.training.finetune import fit_classifier

logger = logging.getLogger("structured_report")

RATIOS = (0.25, 0.5, 0.75)
BATCHES = (1, 256)
SENSITIVITIES = ("ecp", "local", "obd", "norm", "norm_io")
RESULTS = Path(__file__).resolve().parent.parent / "docs" / "results"


def make_mnist_mlp(seed: int = 0) -> nn.Sequential:
    """The 784-300-100-10 ReLU MLP (LeNet-300-100)."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(784, 300), nn.ReLU(), nn.Linear(300, 100), nn.ReLU(), nn.Linear(100, 10))


def shrunk_copy(model: nn.Module, ratio: float) -> nn.Module:
    """A copy with ``ratio`` of every hidden layer's units removed (norm score: timing needs no data)."""
    if ratio == 0:
        return copy.deepcopy(model)
    return prune_neurons(model, ratio, method="norm", scope="layer", inplace=False).model


def _inference(model: nn.Module, x: torch.Tensor) -> None:
    with torch.inference_mode():
        model(x)


def speed_rows(threads: int, rounds: int) -> list[Row]:
    """Dense vs neuron-pruned inference time of the MNIST MLP, one row per removed fraction and batch."""
    torch.set_num_threads(threads)
    dense = make_mnist_mlp().eval()
    models = {0.0: dense, **{ratio: shrunk_copy(dense, ratio).eval() for ratio in RATIOS}}
    rows = []
    for batch in BATCHES:
        x = torch.randn(batch, 784, generator=torch.Generator().manual_seed(0))
        calls = {f"{ratio:.0%} removed": partial(_inference, model, x) for ratio, model in models.items()}
        # Short bursts: on a loaded machine a burst that fits in one scheduler slice is undisturbed.
        times = interleaved_times(calls, rounds=rounds, burst=50 if batch == 1 else 2)
        case = f"784-300-100-10 MLP, batch {batch}, {threads} thread(s)"
        for (name, timing), (ratio, model) in zip(times.items(), models.items(), strict=True):
            hidden = [m.out_features for m in model if isinstance(m, nn.Linear)][:-1]
            extra = {"threads": threads, "batch": batch, "removed": ratio}
            extra.update(hidden="-".join(str(h) for h in hidden), parameters=sum(p.numel() for p in model.parameters()))
            rows.append(timing_row("structured", case, name, timing, "us", **extra))
    return rows


def speed_table(rows: list[Row]) -> list[dict[str, Any]]:
    """The speed rows as the table of docs/structured.md: time per call and speed-up over dense."""
    dense = {row.case: row.minimum for row in rows if row.settings()["removed"] == 0.0}
    return [{**row.settings(), "microseconds": row.minimum, "speedup": dense[row.case] / row.minimum} for row in rows]


def two_four_rows(rounds: int) -> list[Row]:
    """Batch-256 time of a 784->300 Linear: dense, 2:4-masked dense, CSR sparse (CPU)."""
    torch.set_num_threads(1)
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(300, 784, generator=generator)
    groups = weight.abs().reshape(300, 196, 4)
    keep = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, groups.topk(2, dim=-1).indices, True)
    masked = weight * keep.reshape(300, 784)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "sparse CSR support is in beta"
        csr = masked.to_sparse_csr()
    bias = torch.zeros(300)
    x = torch.randn(256, 784, generator=generator)
    calls = {
        "dense weight": lambda: F.linear(x, weight, bias),
        "2:4-masked dense weight": lambda: F.linear(x, masked, bias),
        # (W x^T)^T: the CSR matrix must be the left operand of the sparse product.
        "CSR sparse weight (50% zeros)": lambda: (csr @ x.t()).t() + bias,
    }
    with torch.inference_mode():
        times = interleaved_times(calls, rounds=rounds, burst=2)
    case = "784->300 Linear, batch 256, 1 thread"
    return [timing_row("structured", case, name, timing, "us", threads=1, batch=256) for name, timing in times.items()]


def two_four_table(rows: list[Row]) -> list[dict[str, Any]]:
    """The 2:4 rows as the table of docs/structured.md: time per call relative to the dense weight."""
    dense = next(row.minimum for row in rows if row.contender == "dense weight")
    return [
        {"weight": row.contender, "microseconds": row.minimum, "relative_to_dense": row.minimum / dense} for row in rows
    ]


# ---- quality --------------------------------------------------------------------------------------


def batches_of(x: torch.Tensor, y: torch.Tensor, size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Consecutive ``(inputs, targets)`` slices of ``size``."""
    return [(x[start : start + size], y[start : start + size]) for start in range(0, x.shape[0], size)]


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    """Test cross-entropy and accuracy."""
    model.eval()
    logits = model(x)
    return F.cross_entropy(logits, y).item(), (logits.argmax(1) == y).float().mean().item()


def quality_rows(
    task: str,
    model: nn.Module,
    calibration: list[tuple[torch.Tensor, torch.Tensor]],
    train_batches: list[tuple[torch.Tensor, torch.Tensor]],
    test: tuple[torch.Tensor, torch.Tensor],
    finetune_steps: int,
    scopes: tuple[str, ...],
    seed: int = 0,
) -> list[dict[str, Any]]:
    """Every sensitivity x ratio x scope on copies of ``model``, before and after fine-tuning."""
    dense_loss, dense_accuracy = evaluate(model, *test)
    rows = [
        {
            "task": task,
            "seed": seed,
            "method": "dense",
            "scope": "-",
            "removed": 0.0,
            "parameters": sum(p.numel() for p in model.parameters()),
            "loss": dense_loss,
            "accuracy": dense_accuracy,
            "loss_finetuned": dense_loss,
            "accuracy_finetuned": dense_accuracy,
        }
    ]
    base = Pruner(copy.deepcopy(model), sensitivity="output", seed=seed, progress=False)
    base.calibrate(calibration)
    for scope in scopes:
        for method in SENSITIVITIES:
            for ratio in RATIOS:
                report = prune_neurons(base, ratio, method=method, scope=scope, inplace=False)
                pruned = report.model
                loss, accuracy = evaluate(pruned, *test)
                torch.manual_seed(seed)
                finetune(pruned, train_batches, nn.CrossEntropyLoss(), steps=finetune_steps, lr=1e-3, progress=False)
                tuned_loss, tuned_accuracy = evaluate(pruned, *test)
                rows.append(
                    {
                        "task": task,
                        "seed": seed,
                        "method": method,
                        "scope": scope,
                        "removed": ratio,
                        "parameters": report.parameters_after,
                        "loss": loss,
                        "accuracy": accuracy,
                        "loss_finetuned": tuned_loss,
                        "accuracy_finetuned": tuned_accuracy,
                    }
                )
                logger.info(
                    "%s %s %s %.2f: loss %.4f -> %.4f after fine-tuning", task, scope, method, ratio, loss, tuned_loss
                )
    return rows


def mnist_rows(data_dir: str, epochs: int, finetune_steps: int) -> list[dict[str, Any]]:
    """The 784-300-100-10 MLP trained ``epochs`` on MNIST, calibrated on 2048 training samples."""
    from ecp_fast.apps.datasets import load_mnist

    split = load_mnist(data_dir, normalize=True, flatten=True)
    torch.manual_seed(0)
    model = fit_classifier(make_mnist_mlp(0), split.x_train, split.y_train, epochs, lr=1e-3, seed=0)
    generator = torch.Generator().manual_seed(1)
    order = torch.randperm(split.x_train.shape[0], generator=generator)
    calibration = batches_of(split.x_train[order[:2048]], split.y_train[order[:2048]], 256)
    train_batches = batches_of(split.x_train[order], split.y_train[order], 128)
    return quality_rows(
        "mnist", model, calibration, train_batches, (split.x_test, split.y_test), finetune_steps, ("layer", "global")
    )


def digits_rows(seeds: int, finetune_steps: int) -> list[dict[str, Any]]:
    """The demo's 64-16-10 digits MLP (``ecp_fast.apps.demo``), one network per seed."""
    from ecp_fast.apps.demo import load_digits_data, train_mlp

    data = load_digits_data()
    rows = []
    for seed in range(seeds):
        model = train_mlp(data, hidden=16, epochs=60, seed=seed)
        calibration = batches_of(data.train_x, data.train_y, 256)
        rows += quality_rows(
            "digits",
            model,
            calibration,
            batches_of(data.train_x, data.train_y, 128),
            (data.test_x, data.test_y),
            finetune_steps,
            ("layer",),
            seed=seed,
        )
    return rows


# ---- output ---------------------------------------------------------------------------------------


def pivot(rows: list[dict[str, Any]], task: str, scope: str, value: str) -> str:
    """Method x removed-fraction table of ``value``, mean over seeds."""
    header = "| sensitivity | " + " | ".join(f"{r:.0%} removed" for r in RATIOS) + " |"
    lines = [header, "|---|" + "---|" * len(RATIOS)]
    dense = [r[value] for r in rows if r["task"] == task and r["method"] == "dense"]
    lines.append(f"| dense | {sum(dense) / len(dense):.4f} (0%) |" + " |" * (len(RATIOS) - 1))
    for method in SENSITIVITIES:
        cells = []
        for ratio in RATIOS:
            values = [
                r[value]
                for r in rows
                if r["task"] == task and r["scope"] == scope and r["method"] == method and r["removed"] == ratio
            ]
            cells.append(f"{sum(values) / len(values):.4f}" if values else "-")
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--mnist",
        default=os.environ.get("ECP_DATA_DIR")
        or str(Path(__file__).resolve().parents[2] / "shared" / "data" / "mnist"),
        help="MNIST folder (default $ECP_DATA_DIR, else ../shared/data/mnist beside the repository)",
    )
    parser.add_argument("--skip-mnist", action="store_true", help="only speed and digits")
    parser.add_argument("--skip-quality", action="store_true", help="only the speed tables")
    parser.add_argument("--epochs", type=int, default=3, help="MNIST training epochs (default 3)")
    parser.add_argument("--finetune-steps", type=int, default=300, help="fine-tuning steps (default 300)")
    parser.add_argument("--digits-seeds", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=200, help="timing rounds (default 200)")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="torch threads for timing")
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder for the CSV files")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("ecp_fast").setLevel(logging.WARNING)

    machine = machine_info()
    print(machine_line(machine) + "\n")
    speed_measured = [row for threads in args.threads for row in speed_rows(threads, args.rounds)]
    write_csv(args.out / "structured_speed.csv", speed_measured, machine)
    print("## Inference time, 784-300-100-10 MLP (minimum over interleaved rounds)\n")
    print(
        markdown(
            speed_table(speed_measured),
            ["threads", "batch", "removed", "hidden", "parameters", "microseconds", "speedup"],
            {"removed": ".0%", "microseconds": ".1f", "speedup": ".2f"},
        )
    )
    two_four = two_four_rows(args.rounds)
    write_csv(args.out / "structured_2to4_cpu.csv", two_four, machine)
    print("\n## 2:4 on CPU: batch 256 through a 784->300 Linear, 1 thread\n")
    print(
        markdown(
            two_four_table(two_four),
            ["weight", "microseconds", "relative_to_dense"],
            {"microseconds": ".1f", "relative_to_dense": ".2f"},
        )
    )
    if args.skip_quality:
        return
    rows = [] if args.skip_mnist else mnist_rows(args.mnist, args.epochs, args.finetune_steps)
    rows += digits_rows(args.digits_seeds, min(args.finetune_steps, 100))
    write_dict_csv(args.out / "structured_quality.csv", rows)
    for task, scopes in (("mnist", ("layer", "global")), ("digits", ("layer",))):
        if not any(r["task"] == task for r in rows):
            continue
        for scope in scopes:
            for value, label in (
                ("loss", "test loss, no fine-tuning"),
                ("loss_finetuned", "test loss after fine-tuning"),
                ("accuracy", "test accuracy, no fine-tuning"),
                ("accuracy_finetuned", "test accuracy after fine-tuning"),
            ):
                print(f"\n## {task}, scope={scope}: {label}\n")
                print(pivot(rows, task, scope, value))


if __name__ == "__main__":
    main()
