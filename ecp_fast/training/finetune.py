"""Fine-tuning that keeps the pruning masks."""

from __future__ import annotations

import itertools
import logging
from typing import Any, Callable, Iterable

import torch
from torch import nn
from tqdm.auto import tqdm

from ecp_fast.pruning.batches import module_device, split_batch, to_device

logger = logging.getLogger(__name__)


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
    """
    if epochs < 1:
        raise ValueError(f"argument 'epochs' must be at least 1, got {epochs}")
    if steps is not None and steps < 1:
        raise ValueError(f"argument 'steps' must be a positive integer or None, got {steps}")
    if lr <= 0:
        raise ValueError(f"argument 'lr' must be positive, got {lr}")
    parameters = [p for p in model.parameters() if p.requires_grad]
    if optimizer == "adam":
        opt: torch.optim.Optimizer = torch.optim.Adam(parameters, lr=lr)
    elif optimizer == "sgd":
        opt = torch.optim.SGD(parameters, lr=lr, momentum=0.9)
    else:
        raise ValueError(f"argument 'optimizer' must be 'adam' or 'sgd', got {optimizer!r}")
    device = module_device(model)
    if steps is not None:
        schedule: Iterable[Any] = itertools.islice(itertools.cycle(batches), steps)
        total: int | None = steps
    else:
        schedule = itertools.chain.from_iterable(batches for _ in range(epochs))
        total = len(batches) * epochs if hasattr(batches, "__len__") else None  # type: ignore[arg-type]
    was_training = model.training
    model.train()
    losses: list[float] = []
    try:
        for batch in tqdm(schedule, total=total, desc="finetune", disable=not progress, leave=False):
            inputs, targets = split_batch(batch)
            if targets is None:
                raise ValueError("argument 'batches': finetune needs (inputs, targets) batches, got inputs only")
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(model(to_device(inputs, device)), to_device(targets, device))
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
    finally:
        model.train(was_training)
    if not losses:
        raise ValueError("argument 'batches': the fine-tuning data is empty (expected at least one batch, got 0)")
    logger.info("fine-tuned %d steps, loss %.4g -> %.4g", len(losses), losses[0], losses[-1])
    return losses


def fit_classifier(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    epochs: int,
    lr: float,
    seed: int,
    batch_size: int = 128,
    progress: bool = False,
    description: str = "train",
) -> nn.Module:
    """Train ``model`` with Adam and cross-entropy on shuffled in-memory batches; returns it in eval mode.

    The shuffling draws from its own generator seeded with ``seed``, so a run is deterministic for
    a seed whatever the global random state. Masks installed by the pruner are kept, as in
    :func:`finetune`.
    """
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    samples = x.shape[0]
    model.train()
    steps = epochs * ((samples + batch_size - 1) // batch_size)
    with tqdm(total=steps, desc=description, disable=not progress, leave=False) as bar:
        for _ in range(epochs):
            order = torch.randperm(samples, generator=generator)
            for start in range(0, samples, batch_size):
                index = order[start : start + batch_size]
                optimizer.zero_grad(set_to_none=True)
                torch.nn.functional.cross_entropy(model(x[index]), y[index]).backward()
                optimizer.step()
                bar.update(1)
    return model.eval()
