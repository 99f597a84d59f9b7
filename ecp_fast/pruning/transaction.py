"""One transaction for every call that changes a model: on any exception, the model comes back exactly.

::

    with model_transaction(model) as transaction:
        transaction.on_rollback(lambda: setattr(pruner, "calibration", old_calibration))
        ...   # install masks, shift biases, replace layers; an exception (KeyboardInterrupt too) undoes it all

The snapshot covers every submodule reachable from the model (and from ``extra_modules``):

* parameter and buffer values (copied once, optionally to the CPU), ``requires_grad`` and ``.grad``;
* which tensor objects are where: each module's ``_parameters``, ``_buffers`` and ``_modules`` dicts
  are restored in place, so a bias added during the call is removed again, a replaced or added layer
  is taken out, and the original ``Parameter`` objects are back (an optimizer holding them keeps working);
* ``torch.nn.utils.prune`` re-parametrisations (``weight_orig`` / ``weight_mask`` and their forward
  pre-hooks), ``torch.nn.utils.parametrize`` parametrizations (the module's class is restored too)
  and the old-style ``weight_norm`` / ``spectral_norm`` hooks;
* every hook dict of every submodule (forward, forward pre, backward, state-dict hooks), ``training``
  flags and every other attribute of each module (``in_features``, ``num_features``, ...).

Hook dicts and the other containers are restored in place, so ``RemovableHandle`` objects the
caller holds stay valid. Nothing is deep-copied; the cost is one copy of the tensors
(``values=False`` skips it for calls that only re-wire modules, such as replacing layers).
Global hooks (``torch.nn.modules.module.register_module_forward_hook``) are not covered.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Literal

import torch
from torch import nn
from torch.nn.parameter import Parameter, UninitializedTensorMixin  # type: ignore[attr-defined]  # not in the stubs
from torch.nn.utils import parametrize
from torch.nn.utils import prune as torch_prune

logger = logging.getLogger(__name__)

__all__ = ["ModelSnapshot", "ModelTransaction", "model_transaction"]

_MISSING = object()


@dataclass
class _ModuleRecord:
    """One module: its class, a shallow copy of ``__dict__`` and of every container in it."""

    module: nn.Module
    cls: type
    attributes: dict[str, Any]
    containers: dict[str, Any]
    pruning_hooks: list[tuple[Any, dict[str, Any]]]
    class_attributes: dict[str, Any] | None


@dataclass
class _TensorRecord:
    """One parameter or buffer: the object, a copy of its value, and where the value lived."""

    tensor: torch.Tensor
    value: torch.Tensor | None
    shape: torch.Size
    dtype: torch.dtype
    device: torch.device
    requires_grad: bool
    grad: torch.Tensor | None


def _record_module(module: nn.Module) -> _ModuleRecord:
    attributes = dict(vars(module))
    containers: dict[str, Any] = {}
    for key, value in attributes.items():
        if isinstance(value, dict):
            containers[key] = dict(value)
        elif isinstance(value, list):
            containers[key] = list(value)
        elif isinstance(value, set):
            containers[key] = set(value)
    # prune.PruningContainer hooks grow in place when a layer is pruned again: keep their attributes
    pruning_hooks = [
        (hook, dict(vars(hook)))
        for hook in module._forward_pre_hooks.values()
        if isinstance(hook, torch_prune.BasePruningMethod)
    ]
    # parametrize gives each module its own generated class and adds or deletes properties on it
    class_attributes = dict(vars(type(module))) if parametrize.is_parametrized(module) else None
    return _ModuleRecord(module, type(module), attributes, containers, pruning_hooks, class_attributes)


def _copy(tensor: torch.Tensor, storage: torch.device | None) -> torch.Tensor:
    if storage is None or storage == tensor.device:
        return tensor.detach().clone()
    return tensor.detach().to(storage, copy=True)


def _record_tensor(tensor: torch.Tensor, values: bool, storage: torch.device | None) -> _TensorRecord:
    if isinstance(tensor, UninitializedTensorMixin):  # a lazy module's placeholder: no values, no shape yet
        return _TensorRecord(tensor, None, torch.Size(), tensor.dtype, tensor.device, tensor.requires_grad, None)
    grad = tensor.grad if isinstance(tensor, Parameter) else None
    if values and grad is not None:
        grad = _copy(grad, storage)
    return _TensorRecord(
        tensor=tensor,
        value=_copy(tensor, storage) if values else None,
        shape=tensor.shape,
        dtype=tensor.dtype,
        device=tensor.device,
        requires_grad=tensor.requires_grad,
        grad=grad,
    )


def _restore_class(cls: type, saved: dict[str, Any]) -> None:
    """Put back the properties parametrize added to or deleted from a generated class."""
    current = vars(cls)
    for key in [key for key in current if key not in saved]:
        delattr(cls, key)
    for key, value in saved.items():
        if current.get(key, _MISSING) is not value:
            setattr(cls, key, value)


def _restore_module(record: _ModuleRecord) -> None:
    module = record.module
    if type(module) is not record.cls:
        module.__class__ = record.cls  # parametrize swaps in a generated subclass
    if record.class_attributes is not None:
        _restore_class(record.cls, record.class_attributes)
    attributes = vars(module)
    for key in [key for key in attributes if key not in record.attributes]:
        del attributes[key]
    attributes.update(record.attributes)
    for key, saved in record.containers.items():
        container = record.attributes[key]
        if isinstance(container, dict):
            container.clear()
            container.update(saved)
        elif isinstance(container, list):
            container[:] = saved
        else:
            container.clear()
            container.update(saved)
    for hook, hook_attributes in record.pruning_hooks:
        vars(hook).clear()
        vars(hook).update(hook_attributes)


@torch.no_grad()
def _restore_tensor(record: _TensorRecord) -> None:
    tensor = record.tensor
    if record.value is not None:
        same_layout = tensor.shape == record.shape and tensor.dtype == record.dtype and tensor.device == record.device
        if same_layout:
            tensor.copy_(record.value)
        else:  # the call replaced ``.data`` (prune.remove, .to(), a resize): put a tensor like the old one back
            tensor.data = record.value.to(device=record.device, dtype=record.dtype)
    if tensor.is_leaf and tensor.requires_grad != record.requires_grad:
        tensor.requires_grad_(record.requires_grad)
    if isinstance(tensor, Parameter):
        grad = record.grad
        tensor.grad = None if grad is None else grad.to(device=record.device)


class ModelSnapshot:
    """The state of one or more module trees, restorable in place (see the module docstring).

    Args:
        modules: roots of the trees; shared submodules and tied parameters are recorded once.
        values: copy parameter and buffer values (False: record structure only, for calls that
            re-wire modules without writing into tensors).
        storage: device the copies are kept on (e.g. ``"cpu"`` to spare accelerator memory);
            None keeps each copy beside its tensor.
    """

    def __init__(
        self, modules: Iterable[nn.Module], values: bool = True, storage: torch.device | str | None = None
    ) -> None:
        roots = list(modules)
        for index, root in enumerate(roots):
            if not isinstance(root, nn.Module):
                raise TypeError(
                    f"ModelSnapshot: argument 'modules' must hold nn.Module objects, got "
                    f"{type(root).__name__} at position {index}"
                )
        device = None if storage is None else torch.device(storage)
        seen: set[int] = set()
        self._modules: list[_ModuleRecord] = []
        for root in roots:
            for module in root.modules():
                if id(module) not in seen:
                    seen.add(id(module))
                    self._modules.append(_record_module(module))
        self._tensors: list[_TensorRecord] = []
        seen_tensors: set[int] = set()
        for record in self._modules:
            for key in ("_parameters", "_buffers"):
                for tensor in record.containers.get(key, {}).values():
                    if tensor is not None and id(tensor) not in seen_tensors:
                        seen_tensors.add(id(tensor))
                        self._tensors.append(_record_tensor(tensor, values, device))

    @property
    def modules(self) -> list[nn.Module]:
        """The recorded modules, roots first."""
        return [record.module for record in self._modules]

    def restore(self) -> None:
        """Put every recorded module and tensor back; raises RuntimeError naming what could not be."""
        failures: list[str] = []
        for record in self._modules:
            try:
                _restore_module(record)
            except Exception as error:  # keep restoring the rest
                failures.append(f"module {type(record.module).__name__}: {error!r}")
        for tensor_record in self._tensors:
            try:
                _restore_tensor(tensor_record)
            except Exception as error:
                failures.append(f"tensor of shape {tuple(tensor_record.shape)}: {error!r}")
        if failures:
            raise RuntimeError("ModelSnapshot.restore: could not restore " + "; ".join(failures))


class ModelTransaction:
    """Context manager: snapshot on entry; on any exception (``BaseException``) restore and re-raise.

    Use :func:`model_transaction` to create one. :meth:`on_rollback` registers undo actions for
    state outside the modules (a pruner's calibration, an optimizer's state); they run after the
    modules are restored, last registered first.
    """

    def __init__(self, snapshot: ModelSnapshot) -> None:
        self.snapshot = snapshot
        self._undo: list[Callable[[], None]] = []
        self._done = False

    def on_rollback(self, undo: Callable[[], None]) -> None:
        """Call ``undo()`` when the transaction rolls back."""
        if not callable(undo):
            raise TypeError(f"on_rollback: argument 'undo' must be callable, got {type(undo).__name__}")
        self._undo.append(undo)

    def rollback(self) -> None:
        """Restore the snapshot now and run the undo actions (at most once per transaction)."""
        if self._done:
            return
        self._done = True
        failures: list[str] = []
        try:
            self.snapshot.restore()
        except RuntimeError as error:
            failures.append(str(error))
        for undo in reversed(self._undo):
            try:
                undo()
            except Exception as error:
                failures.append(f"undo action {undo!r}: {error!r}")
        if failures:
            raise RuntimeError("model_transaction: rollback incomplete: " + "; ".join(failures))

    def __enter__(self) -> ModelTransaction:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> Literal[False]:
        if exc is None:
            self._done = True
            return False
        try:
            self.rollback()
        except RuntimeError as error:  # report, but let the original exception through
            logger.error("%s", error)
            if hasattr(exc, "add_note"):  # Python 3.11+
                exc.add_note(str(error))
        else:
            logger.info("model restored after %s", exc_type.__name__ if exc_type else "an exception")
        return False


def model_transaction(
    model: nn.Module, *extra_modules: nn.Module, values: bool = True, storage: torch.device | str | None = None
) -> ModelTransaction:
    """A :class:`ModelTransaction` over ``model`` and ``extra_modules`` (snapshot taken now).

    Args:
        model: the module tree the call changes.
        extra_modules: other trees changed by the same call (a copy, a block outside the model).
        values: copy parameter and buffer values; False records only structure, hooks, flags and
            attributes (for calls that swap modules or masks without writing into any tensor).
        storage: where the copies live (``"cpu"`` for large models on an accelerator).

    Any exception raised inside the ``with`` block, ``KeyboardInterrupt`` included, restores all
    of it and is re-raised unchanged.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model_transaction: argument 'model' must be an nn.Module, got {type(model).__name__}")
    for index, extra in enumerate(extra_modules):
        if not isinstance(extra, nn.Module):
            raise TypeError(
                f"model_transaction: argument 'extra_modules' must be nn.Module objects, got "
                f"{type(extra).__name__} at position {index}"
            )
    if not isinstance(values, bool):
        raise TypeError(f"model_transaction: argument 'values' must be a bool, got {type(values).__name__}")
    return ModelTransaction(ModelSnapshot((model, *extra_modules), values=values, storage=storage))
