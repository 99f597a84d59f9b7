"""Renamed keywords keep working for one release, with a ``DeprecationWarning``."""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable
from typing import Any, TypeVar

F = TypeVar("F", bound=Callable[..., Any])


def renamed_keyword(old: str, new: str, since: str = "0.2.0") -> Callable[[F], F]:
    """Accept ``old=`` as ``new=`` with a ``DeprecationWarning``; passing both is a ``TypeError``."""

    def decorate(function: F) -> F:
        @functools.wraps(function)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            if old in kwargs:
                if new in kwargs:
                    raise TypeError(
                        f"{function.__qualname__}() got both {old!r} (deprecated) and {new!r}; pass {new!r} only"
                    )
                warnings.warn(
                    f"{function.__qualname__}(): argument {old!r} was renamed to {new!r} in ecp_fast {since}; "
                    f"{old!r} will be removed in the next release",
                    DeprecationWarning,
                    stacklevel=2,
                )
                kwargs[new] = kwargs.pop(old)
            return function(*args, **kwargs)

        return wrapper  # type: ignore[return-value]

    return decorate


def renamed_attribute(module_name: str, renames: dict[str, tuple[str, Any]]) -> Callable[[str], Any]:
    """A module ``__getattr__`` that serves old names (``{old: (new, object)}``) with a warning."""

    def module_getattr(name: str) -> Any:
        if name in renames:
            new, value = renames[name]
            warnings.warn(
                f"{module_name}.{name} was renamed to {new}; the old name will be removed in the next release",
                DeprecationWarning,
                stacklevel=2,
            )
            return value
        raise AttributeError(f"module {module_name!r} has no attribute {name!r}")

    return module_getattr
