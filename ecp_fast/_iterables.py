"""Helpers on the iterables of batches every part of the library takes (a leaf module: no imports
from the package, so any module may use it)."""

from __future__ import annotations

from collections.abc import Sized


def known_length(items: object) -> int | None:
    """``len(items)``, or None where there is none: not ``Sized``, or its ``__len__`` raises
    ``TypeError`` (a ``DataLoader`` over an ``IterableDataset``, a shard of a stream)."""
    if not isinstance(items, Sized):
        return None
    try:
        return len(items)
    except TypeError:
        return None
