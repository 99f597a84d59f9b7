"""Input validation shared by every implementation of the ecp ops.

The C++ kernel repeats these checks with ``TORCH_CHECK`` and the same wording, so an error reads the
same whichever backend raised it: it names the argument, what was expected and what arrived.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

FLOAT_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


class LayerShape(NamedTuple):
    """Sizes the ops agree on: samples ``n``, probes ``p``, inputs ``fan_in``, outputs ``fan_out``."""

    n: int
    p: int
    fan_in: int
    fan_out: int


def _shape(t: torch.Tensor) -> str:
    return "(" + ", ".join(str(s) for s in t.shape) + ("," if t.dim() == 1 else "") + ")"


def check_floating(op: str, name: str, t: torch.Tensor) -> None:
    """Raise ``TypeError`` unless ``t`` is a tensor of one of the supported floating dtypes."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: argument '{name}' must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"{op}: argument '{name}' must have dtype float32, float64, bfloat16 or float16, "
            f"got {t.dtype}"
        )


def check_same_device(op: str, reference_name: str, reference: torch.Tensor, **others: torch.Tensor) -> None:
    """Raise ``ValueError`` when any tensor in ``others`` lives on another device than ``reference``."""
    for name, t in others.items():
        if t.device != reference.device:
            raise ValueError(
                f"{op}: argument '{name}' must be on the same device as '{reference_name}' "
                f"({reference.device}), got {t.device}"
            )


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
    if x.dim() < 2:
        raise ValueError(
            f"{op}: argument 'x' must have at least 2 dimensions (samples..., in), got shape {_shape(x)}"
        )
    fan_in = x.shape[-1]
    n = x.numel() // fan_in if fan_in > 0 else int(torch.Size(x.shape[:-1]).numel())
    if g.dim() not in (2, 3):
        raise ValueError(
            f"{op}: argument 'g' must have shape (N, out) or (P, N, out), got shape {_shape(g)}"
        )
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
            f"{op}: argument 's0' must have shape (out,) = ({fan_out},) to match 'weight', "
            f"got shape {_shape(s0)}"
        )
    for name, t in (("mean", mean), ("m2", m2)):
        if t.shape != weight.shape:
            raise ValueError(
                f"{op}: argument '{name}' must have shape (out, in) = ({fan_out}, {fan_in}) to match "
                f"'weight', got shape {_shape(t)}"
            )


def result_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """float64 when any input is float64, float32 otherwise (half inputs accumulate in float32)."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32
