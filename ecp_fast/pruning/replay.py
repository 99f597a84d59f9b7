"""Replaying the outputs of layers whose inputs and parameters have not changed since they last ran.

A reconstruction runs its working copy of the model once per layer on the same calibration batches
(the layer's inputs, :func:`~ecp_fast.pruning.reconstruction.layer_grams`) and once more at the end
(the outputs an allocation candidate is judged by). In every pass the layers pruned already see the
same inputs as in the pass before and compute the same outputs again. A plain ``nn.Linear``,
``nn.Conv2d`` or Hugging Face ``Conv1D`` computes a pure function of its input, weight and bias, so
:class:`OutputReplay` keeps a copy of each output with the input and the parameters it came from and
hands a copy of it back when a later call brings the identical input (compared exactly) to unchanged
parameters (the same tensors at the same version); every other call runs as usual. The replayed
values are the ones the layer computes, bit for bit.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from torch import nn

from ecp_fast.pruning.batches import storage_address

#: Outputs are kept while they and their inputs fit this many bytes (the reconstruction gives its own budget).
REPLAY_BYTES = 256 << 20


class CacheBudget:
    """Bytes that one or more activation caches share (a reconstruction's replay, its dense layer inputs
    and its reference outputs: together within one budget).

    A kept tensor costs its bytes unless its storage is ``resident``, held anyway (the caller's
    calibration inputs: a view of them costs nothing); a cache gives back what it drops.
    """

    def __init__(self, limit: int, resident: set[int] | None = None) -> None:
        self.limit, self.used = limit, 0
        self.resident = resident or set()
        #: Caches that give way to a :meth:`take` with ``evict``: each is called with the bytes wanted
        #: and drops what it holds (up to about that much) through :meth:`give`.
        self.yielding: list[Callable[[int], None]] = []

    @classmethod
    def of(cls, budget: int | CacheBudget, resident: set[int] | None = None) -> CacheBudget:
        """``budget`` itself when shared, else a budget of its own of that many bytes."""
        if not isinstance(budget, CacheBudget):
            return cls(budget, resident)
        if resident is not None:
            raise ValueError("argument 'resident' belongs to the shared CacheBudget given as 'budget'; pass it there")
        return budget

    def cost(self, tensor: torch.Tensor) -> int:
        """What keeping ``tensor`` (not a copy of it) costs: 0 for a view of a resident storage."""
        return 0 if storage_address(tensor) in self.resident else _bytes(tensor)

    def take(self, size: int, evict: bool = False) -> bool:
        """Reserve ``size`` bytes if they fit, with ``evict`` after the yielding caches have made room;
        False (nothing reserved) otherwise."""
        for release in self.yielding if evict and size <= self.limit else ():
            if self.used + size <= self.limit:
                break
            release(self.used + size - self.limit)
        if self.used + size > self.limit:
            return False
        self.used += size
        return True

    def give(self, size: int) -> None:
        """Return ``size`` bytes a cache no longer holds."""
        self.used -= size


def _parameters(module: nn.Module) -> tuple[Any, ...] | None:
    """The weight and the bias (or None) the module computes with, and their versions (None when an
    inference tensor, which has no version, is among them)."""
    weight, bias = module.weight, getattr(module, "bias", None)
    if not isinstance(weight, torch.Tensor) or weight.is_inference() or (bias is not None and bias.is_inference()):
        return None
    return weight, weight._version, bias, None if bias is None else bias._version


def _same_parameters(first: tuple[Any, ...], second: tuple[Any, ...]) -> bool:
    """The same weight and bias tensors (by identity), unchanged in place (the same versions)."""
    return first[0] is second[0] and first[2] is second[2] and first[1] == second[1] and first[3] == second[3]


def replayable(module: nn.Module) -> bool:
    """True for a module whose forward is a pure function of its input, weight and bias: exactly an
    ``nn.Linear``, ``nn.Conv2d`` or Hugging Face ``Conv1D`` (no subclass, no replaced forward)."""
    kind = type(module)
    hf_conv1d = kind.__name__ == "Conv1D" and kind.__module__.startswith("transformers")
    weight = getattr(module, "weight", None)
    return (
        (kind in (nn.Linear, nn.Conv2d) or hf_conv1d)
        and "forward" not in module.__dict__
        and isinstance(weight, torch.Tensor)
        and not weight.is_inference()
    )


@dataclass
class _Entry:
    inputs: torch.Tensor
    version: int
    parameters: tuple[Any, ...]
    output: torch.Tensor
    size: int  # bytes it holds: the output, and the inputs unless they are resident anyway


class OutputReplay:
    """Keeps the outputs of the modules it is installed on and replays them for identical calls.

    Only calls with one strided tensor argument, outside autograd, are served; ``remove`` puts the modules'
    own forward back (always call it, for example in a ``finally``).
    """

    def __init__(self, budget: int | CacheBudget = REPLAY_BYTES, resident: set[int] | None = None) -> None:
        #: Shared with other caches when given as a :class:`CacheBudget`; storages ``resident`` there
        #: (the calibration batches) cost nothing.
        self.budget = CacheBudget.of(budget, resident)
        self.used = 0  # bytes this replay holds of the budget
        self.entries: dict[nn.Module, list[_Entry]] = {}
        self.cursor: dict[nn.Module, int] = {}

    def install(self, modules: Iterable[nn.Module]) -> None:
        """Serve the calls of every replayable module of ``modules``."""
        if self._release not in self.budget.yielding:
            self.budget.yielding.append(self._release)
        for module in modules:
            if module not in self.entries and replayable(module):
                self.entries[module], self.cursor[module] = [], -1
                module.forward = partial(self._forward, module, module.forward)

    def remove(self) -> None:
        """Restore the modules' forward and drop what was kept."""
        for module in self.entries:
            del module.forward
        self.budget.give(self.used)
        if self._release in self.budget.yielding:
            self.budget.yielding.remove(self._release)
        self.entries, self.cursor, self.used = {}, {}, 0

    def _release(self, wanted: int) -> None:
        """Give way to a cache that counts for more (see :meth:`CacheBudget.take`): drop kept outputs,
        the deepest layers' and the latest first, until ``wanted`` bytes are free or none are left."""
        freed = 0
        for entries in reversed(self.entries.values()):
            while entries and freed < wanted:
                freed += entries.pop().size
        self.budget.give(freed)
        self.used -= freed

    def _find(self, module: nn.Module, inputs: torch.Tensor, parameters: tuple[Any, ...]) -> _Entry | None:
        """The entry of exactly this input and these parameters, looked for from the one after the last found."""
        entries = self.entries[module]
        for step in range(1, len(entries) + 1):
            index = (self.cursor[module] + step) % len(entries)
            entry = entries[index]
            if (
                entry.inputs.shape == inputs.shape
                and entry.inputs.dtype == inputs.dtype
                and entry.inputs.device == inputs.device
                and entry.inputs._version == entry.version
                and _same_parameters(entry.parameters, parameters)
                and (entry.inputs is inputs or torch.equal(entry.inputs, inputs))
            ):
                self.cursor[module] = index
                return entry
        return None

    def _keep(self, module: nn.Module, inputs: torch.Tensor, parameters: tuple[Any, ...], output: torch.Tensor) -> None:
        """Store a copy of ``output`` (entries from older parameters are dropped first) while within budget."""
        entries = self.entries[module]
        stale = [entry for entry in entries if not _same_parameters(entry.parameters, parameters)]
        if stale:
            freed = sum(entry.size for entry in stale)
            self.budget.give(freed)
            self.used -= freed
            entries[:] = [entry for entry in entries if _same_parameters(entry.parameters, parameters)]
        size = _bytes(output) + self.budget.cost(inputs)
        if self.budget.take(size):
            entries.append(_Entry(inputs, inputs._version, parameters, output.detach().clone(), size))
            self.cursor[module] = len(entries) - 1
            self.used += size

    def _forward(self, module: nn.Module, forward: Any, *args: Any, **kwargs: Any) -> Any:
        """The module's forward, served from the kept outputs where the call is identical to a kept one."""
        inputs = args[0] if len(args) == 1 and not kwargs else None
        parameters = _parameters(module)
        if (
            not isinstance(inputs, torch.Tensor)
            or inputs.layout != torch.strided  # sparse inputs are compared and kept by no one here
            or inputs.is_inference()
            or torch.is_grad_enabled()
            or not parameters
        ):
            return forward(*args, **kwargs)
        entry = self._find(module, inputs, parameters)
        if entry is not None:
            return entry.output.clone()
        output = forward(inputs)
        if isinstance(output, torch.Tensor):
            self._keep(module, inputs, parameters, output)
        return output


def _bytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()
