"""Checks of arguments every part of the library takes (a leaf module: no imports from the package)."""

from __future__ import annotations

from torch import nn


def check_module(value: object, name: str = "model") -> None:
    """``TypeError`` naming argument ``name`` unless ``value`` is an ``nn.Module``."""
    if not isinstance(value, nn.Module):
        raise TypeError(f"argument {name!r} must be a torch.nn.Module, got {type(value).__name__}")
