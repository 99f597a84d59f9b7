"""Which form of a layer is faster on the inputs it really receives (the exports' ``example_inputs``).

One run of the model on the example inputs captures the first input of every layer of interest; each
layer is then timed in its two forms (dense and CSR, dense and 2:4) in interleaved rounds, and the
second form is chosen only when clearly faster (:data:`MEASURE_MARGIN`): near-ties flip with noise.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from ecp_fast.export.timing import interleaved_times
from ecp_fast.pruning.batches import eval_mode

#: A measured alternative form must be this much faster to be chosen: near-ties flip with machine noise.
MEASURE_MARGIN = 0.1


def check_example_inputs(example_inputs: Any) -> tuple[Any, ...]:
    """``example_inputs`` as the tuple of positional arguments for the model; ``TypeError`` unless a tensor or tuple."""
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    if isinstance(example_inputs, tuple):
        return example_inputs
    raise TypeError(
        "argument 'example_inputs' must be a tensor or a tuple of positional arguments for the model, "
        f"got {type(example_inputs).__name__}"
        + (" (pass the tensor, or a tuple)" if isinstance(example_inputs, list) else "")
    )


def _shapes(arguments: tuple[Any, ...]) -> str:
    described = [
        str(tuple(value.shape)) if isinstance(value, torch.Tensor) else type(value).__name__ for value in arguments
    ]
    return f"shape {described[0]}" if len(described) == 1 else f"shapes ({', '.join(described)})"


def capture_layer_inputs(
    model: nn.Module, layers: Mapping[str, nn.Module], example_inputs: Any
) -> dict[str, torch.Tensor]:
    """The first input each layer sees when ``model`` runs on ``example_inputs``.

    Raises ``TypeError`` for ``example_inputs`` that are not a tensor or tuple, ``ValueError`` naming
    them and their shapes when the model does not run on them.
    """
    arguments = check_example_inputs(example_inputs)
    captured: dict[str, torch.Tensor] = {}
    misfits: list[str] = []  # the layers that received an input of the wrong last size, in call order
    handles = []
    for name, module in layers.items():

        def hook(layer: nn.Module, args: tuple[Any, ...], name: str = name) -> None:
            if not args or not isinstance(args[0], torch.Tensor):
                return  # the layer's own forward reports it
            captured.setdefault(name, args[0].detach())
            expected = getattr(layer, "in_features", None)
            if expected is not None and tuple(args[0].shape[-1:]) != (expected,):
                misfits.append(f"layer {name!r} expects a last size of {expected}, got {tuple(args[0].shape)}")

        handles.append(module.register_forward_pre_hook(hook))
    try:
        # Evaluation mode, so that the run neither drops units nor updates batch-norm statistics.
        with eval_mode(model), torch.no_grad():
            model(*arguments)
    except (RuntimeError, ValueError, TypeError, IndexError) as error:
        where = f"{misfits[0]}; " if misfits else ""
        message = " ".join(str(error).split())[:300]
        raise ValueError(
            f"argument 'example_inputs': the model does not run on inputs of {_shapes(arguments)}: "
            f"{where}{type(error).__name__}: {message}"
        ) from error
    finally:
        for handle in handles:
            handle.remove()
    return captured


#: One form of a layer: a module, or any callable from its input to its output.
Form = Callable[[torch.Tensor], object]


def time_forms(first: Form, second: Form, inputs: torch.Tensor, rounds: int) -> tuple[float, float]:
    """Minimum seconds per call of two forms of a layer on ``inputs`` (interleaved rounds, no graph).

    A module form is timed through its ``forward``, without its hooks: the user's hook functions must
    not run once per timing call (and they are not part of either form's cost).
    """
    # GPU kernels run asynchronously: without a synchronisation only the launch would be timed.
    synchronize = torch.cuda.synchronize if inputs.is_cuda else (lambda: None)

    def timed(form: Form) -> Callable[[], None]:
        run = form.forward if isinstance(form, nn.Module) else form

        def call() -> None:
            run(inputs)
            synchronize()

        return call

    with torch.no_grad():
        times = interleaved_times({"first": timed(first), "second": timed(second)}, rounds=rounds)
    return times["first"].minimum, times["second"].minimum


def faster(first_seconds: float, second_seconds: float) -> bool:
    """Whether the second form wins: at least :data:`MEASURE_MARGIN` faster than the first."""
    return second_seconds < first_seconds * (1 - MEASURE_MARGIN)
