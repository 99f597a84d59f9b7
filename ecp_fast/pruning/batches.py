"""Calibration batches: what a batch holds, how the model is called on it, where it lives."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


def split_batch(batch: Any) -> tuple[Any, Any]:
    """``inputs`` or ``(inputs, targets)`` (tuple, list) -> ``(inputs, targets or None)``."""
    if isinstance(batch, (tuple, list)):
        if len(batch) == 1:
            return batch[0], None
        if len(batch) == 2:
            return batch[0], batch[1]
        raise ValueError(
            f"argument 'batches': each batch must be inputs or (inputs, targets), got a sequence of {len(batch)} items"
        )
    return batch, None


def to_device(value: Any, device: torch.device) -> Any:
    """``value`` on ``device`` when it is a tensor; anything else unchanged."""
    if isinstance(value, torch.Tensor):
        return value.to(device)
    return value


def module_device(module: nn.Module) -> torch.device:
    """Where a module computes: the device of its first parameter (or buffer); CPU for an empty one."""
    for tensor in module.parameters():
        return tensor.device
    for tensor in module.buffers():
        return tensor.device
    return torch.device("cpu")
