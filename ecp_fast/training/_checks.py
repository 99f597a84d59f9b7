"""Argument checks shared by the training functions: every error names the function, the argument,
what was expected and what arrived, and is raised before the model changes."""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable, Sequence
from typing import Any

import torch


def _fail(owner: str, name: str, expected: str, value: Any, error: type[Exception] = ValueError) -> None:
    shown = repr(value) if isinstance(value, (numbers.Number, str, type(None))) else type(value).__name__
    raise error(f"{owner}: argument '{name}' must be {expected}, got {shown}")


def check_int(owner: str, name: str, value: Any, minimum: int, allow_none: bool = False) -> None:
    """``value`` is an ``int`` (not a bool) of at least ``minimum`` (or None when allowed)."""
    if value is None and allow_none:
        return
    expected = f"an integer >= {minimum}" + (" or None" if allow_none else "")
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        _fail(owner, name, expected, value, TypeError)
    if value < minimum:
        _fail(owner, name, expected, value)


def check_real(
    owner: str,
    name: str,
    value: Any,
    low: float | None = None,
    high: float | None = None,
    open_low: bool = True,
    open_high: bool = True,
    allow_none: bool = False,
) -> None:
    """``value`` is a finite real number in the interval ``low..high`` (open or closed ends)."""
    if value is None and allow_none:
        return
    left = "(" if open_low else "["
    right = ")" if open_high else "]"
    interval = f" in {left}{'-inf' if low is None else low}, {'inf' if high is None else high}{right}"
    expected = "a finite number" + (interval if low is not None or high is not None else "")
    expected += " or None" if allow_none else ""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        _fail(owner, name, expected, value, TypeError)
    if not math.isfinite(value):
        _fail(owner, name, expected, value)
    if low is not None and (value < low or (open_low and value == low)):
        _fail(owner, name, expected, value)
    if high is not None and (value > high or (open_high and value == high)):
        _fail(owner, name, expected, value)


def check_callable(owner: str, name: str, value: Any, allow_none: bool = False) -> None:
    """``value`` can be called (or is None when allowed)."""
    if value is None and allow_none:
        return
    if not callable(value):
        _fail(owner, name, "callable" + (" or None" if allow_none else ""), value, TypeError)


def check_bool(owner: str, name: str, value: Any) -> None:
    """``value`` is True or False."""
    if not isinstance(value, bool):
        _fail(owner, name, "True or False", value, TypeError)


def check_choice(owner: str, name: str, value: Any, choices: Sequence[str]) -> None:
    """``value`` is one of ``choices``."""
    if not isinstance(value, str) or value not in choices:
        _fail(owner, name, f"one of {tuple(choices)}", value)


def check_batches(owner: str, batches: Any, reiterable: bool, items: tuple[int, int | None] | None = (2, 2)) -> None:
    """``batches`` is an iterable of batches; a one-shot iterator only when ``reiterable`` is False.

    A sized ``batches`` must not be empty; a list or tuple is checked batch by batch: with
    ``items=(least, most)`` every batch is a tuple or list of that many entries ((inputs, targets)
    pairs for ``(2, 2)``; ``most`` None for no upper bound). Other iterables are not iterated here
    (a shuffling DataLoader would draw random numbers).
    """
    expected = "an iterable of (inputs, targets) batches (a list or a DataLoader)"
    if batches is None or isinstance(batches, (str, bytes, torch.Tensor)) or not isinstance(batches, Iterable):
        hint = "; wrap a single batch in a list" if isinstance(batches, torch.Tensor) else ""
        _fail(owner, "batches", expected + hint, batches, TypeError)
    if reiterable and iter(batches) is batches:
        raise ValueError(
            f"{owner}: argument 'batches' is a one-shot iterator or generator ({type(batches).__name__}), but it is "
            "iterated more than once; pass a re-iterable (a DataLoader or a list), not a generator"
        )
    if hasattr(batches, "__len__") and len(batches) == 0:
        raise ValueError(
            f"{owner}: argument 'batches' must hold at least one batch, got an empty {type(batches).__name__}"
        )
    if items is None or not isinstance(batches, (list, tuple)):
        return
    least, most = items
    for index, batch in enumerate(batches):
        count = len(batch) if isinstance(batch, (tuple, list)) else None
        if count is None or count < least or (most is not None and count > most):
            got = type(batch).__name__ if count is None else f"a {type(batch).__name__} of {count} items"
            raise ValueError(
                f"{owner}: argument 'batches' must hold (inputs, targets) pairs, got {got} at index {index}"
            )


def checked_loss(owner: str, loss: Any) -> torch.Tensor:
    """``loss`` as ``loss_fn`` returned it, which must be a scalar tensor (``TypeError`` /
    ``ValueError`` naming ``loss_fn`` otherwise)."""
    if not isinstance(loss, torch.Tensor):
        raise TypeError(f"{owner}: argument 'loss_fn' must return a tensor, got {type(loss).__name__}")
    if loss.numel() != 1:
        raise ValueError(f"{owner}: argument 'loss_fn' must return a scalar loss, got shape {tuple(loss.shape)}")
    return loss


def non_finite_loss(owner: str, where: str) -> ValueError:
    """The error for a NaN or infinite loss: training on it would make every weight NaN."""
    return ValueError(
        f"{owner}: the loss {where} is NaN or Inf (expected finite; check argument 'batches' for NaN or Inf "
        "and argument 'loss_fn'); the model is restored"
    )
