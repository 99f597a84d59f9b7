"""The command line's user errors, in a module of their own so that every command can raise them."""

from __future__ import annotations


class UsageError(ValueError):
    """A mistake in what the user asked for; the command line prints its message as one line."""
