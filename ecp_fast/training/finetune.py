"""Fine-tuning that keeps the pruning masks."""

from __future__ import annotations

import itertools
import logging
import math
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

import torch
from torch import nn
from tqdm.auto import tqdm

from ecp_fast.pruning.batches import module_device, split_batch, to_device, train_mode
from ecp_fast.pruning.transaction import model_transaction
from ecp_fast.training._checks import (
    check_batches,
    check_bool,
    check_callable,
    check_choice,
    check_int,
    check_real,
    checked_loss,
    non_finite_loss,
)

logger = logging.getLogger(__name__)

ModuleT = TypeVar("ModuleT", bound=nn.Module)


def _check_finetune(
    model: Any, batches: Any, loss_fn: Any, epochs: Any, steps: Any, lr: Any, optimizer: Any, progress: Any
) -> None:
    """Raise ``TypeError`` / ``ValueError`` for a bad argument of :func:`finetune` (model untouched)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"finetune: argument 'model' must be an nn.Module, got {type(model).__name__}")
    check_int("finetune", "epochs", epochs, 1)
    check_int("finetune", "steps", steps, 1, allow_none=True)
    check_real("finetune", "lr", lr, low=0.0)
    check_choice("finetune", "optimizer", optimizer, ("adam", "sgd"))
    check_callable("finetune", "loss_fn", loss_fn)
    check_bool("finetune", "progress", progress)
    # With steps, itertools.cycle keeps what one pass yields; epochs > 1 iterate the batches again.
    check_batches("finetune", batches, reiterable=steps is None and epochs > 1)
    if not any(p.requires_grad for p in model.parameters()):
        raise ValueError("finetune: argument 'model' must have parameters that require gradients, got none")


def _schedule(batches: Iterable[Any], epochs: int, steps: int | None) -> tuple[Iterable[Any], int | None]:
    """The batches of the whole run and their number (None when unknown)."""
    if steps is not None:
        return itertools.islice(itertools.cycle(batches), steps), steps
    total = len(batches) * epochs if hasattr(batches, "__len__") else None  # type: ignore[arg-type]
    return itertools.chain.from_iterable(batches for _ in range(epochs)), total


def finetune(
    model: nn.Module,
    batches: Iterable[Any],
    loss_fn: Callable[[torch.Tensor, Any], torch.Tensor],
    epochs: int = 1,
    steps: int | None = None,
    lr: float = 1e-3,
    optimizer: str = "adam",
    progress: bool = True,
) -> list[float]:
    """Train ``model`` on ``(inputs, targets)`` batches with its pruned weights held at zero.

    Masks installed by the pruner (``torch.nn.utils.prune``) multiply the weight on every forward
    pass, so the removed weights get no gradient and stay zero. Runs ``epochs`` passes over
    ``batches`` or, when ``steps`` is given, exactly that many optimiser steps (cycling the data).
    Returns the loss of every step. The model's train/eval mode is restored afterwards.

    Every argument is checked first (``TypeError`` / ``ValueError``; several epochs need
    re-iterable batches). Training runs in a
    :func:`~ecp_fast.pruning.transaction.model_transaction`: when it fails (a bad batch, a loss
    that raises, ``KeyboardInterrupt``), the model is restored exactly and the error re-raised.
    """
    _check_finetune(model, batches, loss_fn, epochs, steps, lr, optimizer, progress)
    parameters = [p for p in model.parameters() if p.requires_grad]
    opt: torch.optim.Optimizer = (
        torch.optim.Adam(parameters, lr=lr) if optimizer == "adam" else torch.optim.SGD(parameters, lr=lr, momentum=0.9)
    )
    device = module_device(model)
    schedule, total = _schedule(batches, epochs, steps)
    losses: list[float] = []
    with model_transaction(model), train_mode(model):  # every submodule's own mode comes back after
        for batch in tqdm(schedule, total=total, desc="finetune", disable=not progress, leave=False):
            inputs, targets = split_batch(batch)
            if targets is None:
                raise ValueError("finetune: argument 'batches' must hold (inputs, targets) pairs, got inputs only")
            opt.zero_grad(set_to_none=True)
            loss = checked_loss("finetune", loss_fn(model(to_device(inputs, device)), to_device(targets, device)))
            losses.append(float(loss.detach()))
            if not math.isfinite(losses[-1]):
                raise non_finite_loss("finetune", f"of step {len(losses)}")
            loss.backward()
            opt.step()
        if not losses:
            raise ValueError("finetune: argument 'batches' yielded no batch (expected at least one, got 0)")
    logger.info("fine-tuned %d steps, loss %.4g -> %.4g", len(losses), losses[0], losses[-1])
    return losses


def _check_fit(model: Any, x: Any, y: Any, epochs: Any, lr: Any, seed: Any, batch_size: Any) -> None:
    """Raise for a bad argument of :func:`fit_classifier`."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"fit_classifier: argument 'model' must be an nn.Module, got {type(model).__name__}")
    for name, value in (("x", x), ("y", y)):
        if not isinstance(value, torch.Tensor) or value.dim() == 0:
            raise TypeError(
                f"fit_classifier: argument '{name}' must be a tensor with a sample dimension, got "
                f"{type(value).__name__}"
            )
    if x.shape[0] != y.shape[0]:
        raise ValueError(
            f"fit_classifier: arguments 'x' and 'y' must hold as many samples, got {x.shape[0]} and {y.shape[0]}"
        )
    check_int("fit_classifier", "epochs", epochs, 0)
    check_int("fit_classifier", "batch_size", batch_size, 1)
    check_int("fit_classifier", "seed", seed, -(2**63))
    check_real("fit_classifier", "lr", lr, low=0.0)


def fit_classifier(
    model: ModuleT,
    x: torch.Tensor,
    y: torch.Tensor,
    epochs: int,
    lr: float,
    seed: int,
    *,
    batch_size: int = 128,
    progress: bool = False,
    description: str = "train",
) -> ModuleT:
    """Train ``model`` with Adam and cross-entropy on shuffled in-memory batches; returns it in eval mode.

    The shuffling draws from its own generator seeded with ``seed``, so a run is deterministic for
    a seed whatever the global random state. Masks installed by the pruner are kept, as in
    :func:`finetune`. Arguments are checked first; a failure while training restores the model.
    """
    _check_fit(model, x, y, epochs, lr, seed, batch_size)
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    samples = x.shape[0]
    steps = epochs * ((samples + batch_size - 1) // batch_size)
    with model_transaction(model), tqdm(total=steps, desc=description, disable=not progress, leave=False) as bar:
        model.train()
        for _ in range(epochs):
            order = torch.randperm(samples, generator=generator)
            for start in range(0, samples, batch_size):
                index = order[start : start + batch_size]
                optimizer.zero_grad(set_to_none=True)
                torch.nn.functional.cross_entropy(model(x[index]), y[index]).backward()
                optimizer.step()
                bar.update(1)
    return model.eval()
