"""Input validation shared by every implementation of the ecp ops.

The C++ kernel repeats these checks with ``TORCH_CHECK`` and the same wording, so an error reads the
same whichever backend raised it: it names the argument, what was expected and what arrived.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

FLOAT_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


class GramShape(NamedTuple):
    """Sizes of a Gram: samples ``n``, and the features ``in_a`` of ``a`` and ``in_b`` of ``b``."""

    n: int
    in_a: int
    in_b: int


class LayerShape(NamedTuple):
    """Sizes the ops agree on: samples ``n``, probes ``p``, inputs ``fan_in``, outputs ``fan_out``."""

    n: int
    p: int
    fan_in: int
    fan_out: int


def _shape(t: torch.Tensor) -> str:
    return "(" + ", ".join(str(s) for s in t.shape) + ("," if t.dim() == 1 else "") + ")"


def check_tensor(op: str, name: str, value: object) -> None:
    """Raise ``TypeError`` unless ``value`` is a tensor (wrappers call this before dispatching)."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{op}: argument '{name}' must be a torch.Tensor, got {type(value).__name__}")


def check_bool(op: str, name: str, value: object) -> None:
    """Raise ``TypeError`` unless ``value`` is a Python bool (the schemas' ``bool`` arguments)."""
    if not isinstance(value, bool):
        raise TypeError(f"{op}: argument '{name}' must be a bool, got {type(value).__name__}")


def refuse_grad(op: str, **tensors: object) -> None:
    """Raise ``RuntimeError`` for the first tensor that requires grad while grad mode is on: the ops have
    no derivative (the registered ops refuse it in their autograd step; a direct launcher call here)."""
    if not torch.is_grad_enabled():
        return
    for name, value in tensors.items():
        if isinstance(value, torch.Tensor) and value.requires_grad:
            raise RuntimeError(grad_message(op, name))


def grad_message(op: str, name: str) -> str:
    """Why argument ``name`` of ``op`` is refused when it requires grad, and what to do."""
    return (
        f"{op}: argument '{name}' requires grad, but the ecp ops have no derivative; "
        f"pass {name}.detach() or call the op under torch.no_grad()"
    )


def check_floating(op: str, name: str, t: torch.Tensor) -> None:
    """Raise ``TypeError`` unless ``t`` is a tensor of one of the supported floating dtypes."""
    check_tensor(op, name, t)
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{op}: argument '{name}' must have dtype float32, float64, bfloat16 or float16, got {t.dtype}")


def check_same_device(op: str, reference_name: str, reference: torch.Tensor, **others: torch.Tensor) -> None:
    """Raise ``ValueError`` when any tensor in ``others`` lives on another device than ``reference``."""
    for name, t in others.items():
        if t.device != reference.device:
            raise ValueError(
                f"{op}: argument '{name}' must be on the same device as '{reference_name}' "
                f"({reference.device}), got {t.device}"
            )


def check_samples_matrix(op: str, name: str, t: torch.Tensor) -> None:
    """Raise ``ValueError`` unless ``t`` has at least 2 dimensions: ``(samples..., features)``."""
    if t.dim() < 2:
        raise ValueError(
            f"{op}: argument '{name}' must have at least 2 dimensions (samples..., in), got shape {_shape(t)}"
        )


def sample_count(t: torch.Tensor) -> int:
    """Samples of a ``(samples..., features)`` tensor: the product of all dimensions but the last."""
    return int(torch.Size(t.shape[:-1]).numel())


def check_layer_inputs(op: str, x: torch.Tensor, g: torch.Tensor, weight: torch.Tensor | None = None) -> LayerShape:
    """Validate ``x`` ``(..., in)``, ``g`` ``(N, out)`` or ``(P, N, out)`` and ``weight`` ``(out, in)``.

    Returns the sizes. Extra leading dimensions of ``x`` are samples, so ``N = x.numel() / in``.
    """
    check_floating(op, "x", x)
    check_floating(op, "g", g)
    if weight is not None:
        check_floating(op, "weight", weight)
        check_same_device(op, "x", x, g=g, weight=weight)
    else:
        check_same_device(op, "x", x, g=g)
    check_samples_matrix(op, "x", x)
    fan_in = x.shape[-1]
    n = sample_count(x)
    if g.dim() not in (2, 3):
        raise ValueError(f"{op}: argument 'g' must have shape (N, out) or (P, N, out), got shape {_shape(g)}")
    p = 1 if g.dim() == 2 else g.shape[0]
    if g.shape[-2] != n:
        raise ValueError(
            f"{op}: argument 'g' must have N = {n} samples in dimension {g.dim() - 2} to match 'x' of "
            f"shape {_shape(x)}, got shape {_shape(g)}"
        )
    fan_out = g.shape[-1]
    if weight is not None:
        if weight.dim() != 2 or weight.shape[0] != fan_out or weight.shape[1] != fan_in:
            raise ValueError(
                f"{op}: argument 'weight' must have shape (out, in) = ({fan_out}, {fan_in}) to match "
                f"'g' and 'x', got shape {_shape(weight)}"
            )
    return LayerShape(n=n, p=p, fan_in=fan_in, fan_out=fan_out)


def check_score_inputs(op: str, x: torch.Tensor, g: torch.Tensor, weight: torch.Tensor) -> LayerShape:
    """:func:`check_layer_inputs` for an op whose ``weight`` is required (``None`` is refused)."""
    check_floating(op, "x", x)
    check_floating(op, "g", g)
    check_floating(op, "weight", weight)
    return check_layer_inputs(op, x, g, weight)


def check_finalize_inputs(
    op: str, s0: torch.Tensor, mean: torch.Tensor, m2: torch.Tensor, weight: torch.Tensor
) -> None:
    """Validate the moments triple ``s0 (out,)``, ``mean``/``m2`` ``(out, in)`` against ``weight``."""
    for name, t in (("s0", s0), ("mean", mean), ("m2", m2), ("weight", weight)):
        check_floating(op, name, t)
    check_same_device(op, "weight", weight, s0=s0, mean=mean, m2=m2)
    if weight.dim() != 2:
        raise ValueError(f"{op}: argument 'weight' must have shape (out, in), got shape {_shape(weight)}")
    fan_out, fan_in = weight.shape
    if s0.dim() != 1 or s0.shape[0] != fan_out:
        raise ValueError(
            f"{op}: argument 's0' must have shape (out,) = ({fan_out},) to match 'weight', got shape {_shape(s0)}"
        )
    for name, t in (("mean", mean), ("m2", m2)):
        if t.shape != weight.shape:
            raise ValueError(
                f"{op}: argument '{name}' must have shape (out, in) = ({fan_out}, {fan_in}) to match "
                f"'weight', got shape {_shape(t)}"
            )


def check_gram_inputs(op: str, a: torch.Tensor, b: torch.Tensor | None, weight: torch.Tensor | None) -> GramShape:
    """Validate ``a`` ``(..., in_a)``, optional ``b`` with the same ``N`` samples and ``weight`` ``(N,)``.

    The C++ kernel (csrc/gram_cpu.cpp) runs the same checks in the same order, with the same words.
    """
    check_floating(op, "a", a)
    if b is not None:
        check_floating(op, "b", b)
    if weight is not None:
        check_floating(op, "weight", weight)
    if b is not None:
        check_same_device(op, "a", a, b=b)
    if weight is not None:
        check_same_device(op, "a", a, weight=weight)
    check_samples_matrix(op, "a", a)
    n = sample_count(a)
    in_b = a.shape[-1]
    if b is not None:
        check_samples_matrix(op, "b", b)
        if sample_count(b) != n:
            raise ValueError(
                f"{op}: argument 'b' must have N = {n} samples (the product of its leading dimensions) "
                f"to match 'a' of shape {_shape(a)}, got shape {_shape(b)}"
            )
        in_b = b.shape[-1]
    if weight is not None and (weight.dim() != 1 or weight.shape[0] != n):
        raise ValueError(
            f"{op}: argument 'weight' must have shape (N,) = ({n},) to match 'a' of shape {_shape(a)}, "
            f"got shape {_shape(weight)}"
        )
    return GramShape(n=n, in_a=a.shape[-1], in_b=in_b)


def result_dtype(*tensors: torch.Tensor | None) -> torch.dtype:
    """float64 when any input is float64, float32 otherwise (half inputs accumulate in float32).

    ``None`` entries (absent optional arguments) are skipped.
    """
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) else torch.float32
