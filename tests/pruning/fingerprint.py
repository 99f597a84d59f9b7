"""One fingerprint of a model's whole state, for tests of calls that must leave a model unchanged.

::

    from fingerprint import assert_unchanged, fingerprint      # tests/pruning/*
    from pruning.fingerprint import assert_unchanged, fingerprint   # other test folders

    before = fingerprint(model)
    with pytest.raises(ValueError):
        prune_something(model, bad_argument)
    assert_unchanged(before, model)        # lists every difference when it fails

``failing_after(calls, original, error)`` wraps a function to raise ``error`` after ``calls`` calls,
to inject a failure at a chosen stage of such a call.

The fingerprint holds, for every submodule (by qualified name, shared ones under every name): its
class and that class's properties (``parametrize`` swaps in a generated class and adds a property
per parametrized tensor), its identity, the ``training`` flag, every parameter and buffer
(object identity, shape, dtype, device, ``requires_grad``, exact bits, and the gradient's bits),
the names of plain tensor attributes (``torch.nn.utils.prune`` keeps the masked ``weight`` there),
its parametrizations, the keys, identities and types of the entries of every hook dict (forward,
pre, backward, state-dict hooks; ``prune`` and old-style ``weight_norm`` hooks among them), and its
scalar attributes (``in_features``, ``eps``, ...); plus the exact bits of ``state_dict()``.
Tensors compare bit for bit (NaNs included, ``-0.0`` differs from ``0.0``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize

__all__ = ["Bits", "assert_unchanged", "diff_fingerprints", "fingerprint"]

_SCALARS = (bool, int, float, str, type(None))


class Bits:
    """A tensor's exact bytes, shape, dtype and device; ``==`` compares them bit for bit."""

    def __init__(self, tensor: torch.Tensor) -> None:
        tensor = tensor.detach()
        self.shape = tuple(tensor.shape)
        self.dtype = tensor.dtype
        self.device = str(tensor.device)
        if tensor.device.type == "meta":
            self.data: torch.Tensor | None = None
        else:
            flat = tensor.to("cpu", copy=True).contiguous().reshape(-1)
            self.data = flat.view(torch.uint8) if flat.numel() else flat.to(torch.uint8)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Bits):
            return NotImplemented
        if (self.shape, self.dtype, self.device) != (other.shape, other.dtype, other.device):
            return False
        if self.data is None or other.data is None:
            return self.data is other.data
        return torch.equal(self.data, other.data)

    def __repr__(self) -> str:
        return f"Bits(shape={self.shape}, dtype={self.dtype}, device={self.device})"


def _tensor_entry(tensor: torch.Tensor | None, with_grad: bool) -> Any:
    if tensor is None:
        return None
    entry: dict[str, Any] = {
        "id": id(tensor),
        "type": type(tensor).__name__,
        "requires_grad": tensor.requires_grad,
        "value": Bits(tensor),
    }
    if with_grad:
        entry["grad"] = None if tensor.grad is None else Bits(tensor.grad)
    return entry


def _hooks(module: nn.Module) -> dict[str, list[tuple[Any, int, str]]]:
    return {
        key: [(hook_id, id(hook), type(hook).__name__) for hook_id, hook in value.items()]
        for key, value in sorted(vars(module).items())
        if "hook" in key and isinstance(value, dict)
    }


def _parametrizations(module: nn.Module) -> dict[str, list[str]]:
    if not parametrize.is_parametrized(module):
        return {}
    return {name: [type(p).__name__ for p in plist] for name, plist in module.parametrizations.items()}


def _module_entry(module: nn.Module, grads: bool) -> dict[str, Any]:
    attributes = vars(module)
    return {
        "class": f"{type(module).__module__}.{type(module).__qualname__}",
        "class_properties": sorted(k for k, v in vars(type(module)).items() if isinstance(v, property)),
        "id": id(module),
        "training": module.training,
        "children": [(name, id(child)) for name, child in module._modules.items()],
        "parameters": {name: _tensor_entry(p, grads) for name, p in module._parameters.items()},
        "buffers": {name: _tensor_entry(b, False) for name, b in module._buffers.items()},
        "non_persistent_buffers": sorted(module._non_persistent_buffers_set),
        "tensor_attributes": sorted(k for k, v in attributes.items() if isinstance(v, torch.Tensor)),
        "parametrizations": _parametrizations(module),
        "hooks": _hooks(module),
        "attributes": {
            key: value
            for key, value in sorted(attributes.items())
            if not key.startswith("_") and isinstance(value, _SCALARS + (tuple,))
        },
    }


def fingerprint(model: nn.Module, *extra_modules: nn.Module, grads: bool = True) -> dict[str, Any]:
    """The fingerprint of ``model`` (and ``extra_modules``): see the module docstring."""
    result: dict[str, Any] = {}
    for index, root in enumerate((model, *extra_modules)):
        prefix = "model" if index == 0 else f"extra{index}"
        result[f"{prefix}.modules"] = {
            name: _module_entry(module, grads) for name, module in root.named_modules(remove_duplicate=False)
        }
        result[f"{prefix}.state_dict"] = {key: Bits(value) for key, value in root.state_dict().items()}
    return result


def diff_fingerprints(before: Any, after: Any, path: str = "") -> list[str]:
    """Human-readable differences between two fingerprints (empty when they are equal)."""
    if isinstance(before, dict) and isinstance(after, dict):
        differences = []
        for key in before.keys() - after.keys():
            differences.append(f"{path}/{key}: removed (was {before[key]!r:.200})")
        for key in after.keys() - before.keys():
            differences.append(f"{path}/{key}: added ({after[key]!r:.200})")
        for key in before.keys() & after.keys():
            differences += diff_fingerprints(before[key], after[key], f"{path}/{key}")
        if list(before) != list(after) and not differences:
            differences.append(f"{path}: key order {list(before)} -> {list(after)}")
        return differences
    if before != after:
        return [f"{path}: {before!r:.200} -> {after!r:.200}"]
    return []


def assert_unchanged(before: dict[str, Any], model: nn.Module, *extra_modules: nn.Module, grads: bool = True) -> None:
    """Assert that ``model`` (and ``extra_modules``) still match the fingerprint ``before``."""
    differences = diff_fingerprints(before, fingerprint(model, *extra_modules, grads=grads))
    assert not differences, f"{len(differences)} differences:\n" + "\n".join(sorted(differences)[:30])


def failing_after(calls: int, original: Callable[..., Any], error: BaseException) -> Callable[..., Any]:
    """``original`` for ``calls`` calls, then ``error``."""
    count = {"n": 0}

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if count["n"] >= calls:
            raise error
        count["n"] += 1
        return original(*args, **kwargs)

    return wrapper
