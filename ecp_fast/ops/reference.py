"""Plain-PyTorch implementation of the ecp ops: the oracle for tests and benchmarks.

Everything here follows docs/method.md line by line and computes in float64, so it is slow and
memory-hungry (it materialises the ``(N, in)`` and ``(N, out)`` intermediates) but easy to read and
trust. The fused kernels in ``csrc/`` and ``ecp_fast/triton/`` must agree with it.

Non-finite values follow IEEE arithmetic in float64, then the rounding to the output dtype: a NaN
input makes NaN every statistic it enters, and a float64 value beyond float32's range becomes an
infinity in a float32 output. A neuron is "dead" (zero statistics, docs/method.md) only when its ``s0`` is
exactly zero, never because its gradients are NaN.

Notation: ``x`` is a layer's input ``a`` per sample, ``g`` its output gradients ``dy/dz`` per probe
and sample, ``c = sum_p g_p^2`` the per-sample sensitivity of each output neuron.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import NamedTuple

import torch
from torch import nn

from ecp_fast.ops._checks import (
    check_finalize_inputs,
    check_gram_inputs,
    check_layer_inputs,
    check_score_inputs,
    result_dtype,
    sample_count,
)


def _sensitivity(g: torch.Tensor) -> torch.Tensor:
    """``c[s, i] = sum_p g[p, s, i]^2`` in float64, shape ``(N, out)``."""
    g = g.to(torch.float64)
    return g.square() if g.dim() == 2 else g.square().sum(dim=0)


def _out(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t`` in the output dtype and contiguous, like the fused kernels' outputs (and fake kernels)."""
    return t.to(dtype).contiguous()


def _dead(s0: torch.Tensor) -> torch.Tensor:
    """Neurons that never affect the output: ``s0 <= 0``. A NaN ``s0`` is not dead, it stays NaN."""
    return s0 <= 0


def _moments_wide(x: torch.Tensor, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`moments` in float64, before the rounding to the output dtype (inputs already checked)."""
    n, fan_in = sample_count(x), x.shape[-1]
    a = x.reshape(n, fan_in).to(torch.float64)
    c = _sensitivity(g)
    s0 = c.sum(dim=0)
    dead = _dead(s0).unsqueeze(1)
    # docs/method.md, Numerics: moments of inputs shifted by their column mean leave m2 unchanged and keep
    # the subtraction s2 - s1^2 / s0 small; float64 does the rest.
    shift = a.mean(dim=0) if n > 0 else a.new_zeros(fan_in)
    centred = a - shift
    s1 = c.T @ centred
    s2 = c.T @ centred.square()
    safe_s0 = torch.where(dead, 1.0, s0.unsqueeze(1))
    mean = torch.where(dead, 0.0, shift + s1 / safe_s0)
    m2 = torch.where(dead, 0.0, (s2 - s1.square() / safe_s0).clamp_min(0.0))
    return s0, mean, m2


def moments(x: torch.Tensor, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sensitivity-weighted moments of every input as seen by every neuron.

    Returns ``s0`` ``(out,)`` = ``sum_s c_i^s``, ``mean`` ``(out, in)`` = ``mu_ij`` and ``m2``
    ``(out, in)`` = ``sum_s c_i^s (a_j^s - mu_ij)^2``. Rows with ``s0 = 0`` have mean and m2 zero.
    """
    check_layer_inputs("ecp.moments", x, g)
    out_dtype = result_dtype(x, g)
    s0, mean, m2 = _moments_wide(x, g)
    s0 = _out(s0, out_dtype)
    dead = _dead(s0).unsqueeze(1)  # also where s0 rounds to 0 (sensitivities below out_dtype's range)
    return s0, _out(torch.where(dead, 0.0, mean), out_dtype), _out(torch.where(dead, 0.0, m2), out_dtype)


def _finalize_wide(
    dead: torch.Tensor, mean: torch.Tensor, m2: torch.Tensor, weight: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`finalize` in float64, before the rounding; ``dead`` marks the rows ``(out, 1)`` to zero."""
    w = weight.to(torch.float64)
    importance = torch.where(dead, 0.0, w.square() * m2.to(torch.float64)).clamp_min(0.0)
    bias_delta = torch.where(dead, 0.0, w * mean.to(torch.float64))
    return importance, bias_delta


def finalize(
    s0: torch.Tensor, mean: torch.Tensor, m2: torch.Tensor, weight: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Importance ``I = w^2 m2`` (clamped at 0) and optimal bias shift ``delta* = w mean`` per weight."""
    check_finalize_inputs("ecp.finalize", s0, mean, m2, weight)
    out_dtype = result_dtype(s0, mean, m2, weight)
    importance, bias_delta = _finalize_wide(_dead(s0).unsqueeze(1), mean, m2, weight)
    return _out(importance, out_dtype), _out(bias_delta, out_dtype)


def _compensated_score(
    x: torch.Tensor, g: torch.Tensor, weight: torch.Tensor, out_dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """``finalize(moments(x, g), weight)``, except where rounding a moment loses it.

    The moments are rounded to ``out_dtype`` as ``ecp.moments`` returns them, then multiplied by the
    weight in float64. A moment beyond ``out_dtype``'s range would round to inf, or below it to 0 or a
    subnormal, even where its product with the weight is in range (``m2 = 1e40`` or ``1e-60`` with
    ``w = 1e-2`` or ``1e30``): there the float64 moment is used, and the product is rounded once, as
    the fused kernels compute it.
    """
    wide = _moments_wide(x, g)
    s0, mean, m2 = (t.to(out_dtype) for t in wide)
    dead = _dead(s0).unsqueeze(1)  # as ecp.finalize sees the s0 that ecp.moments returns
    importance, bias_delta = _finalize_wide(dead, mean, m2, weight)
    importance_once, bias_delta_once = _finalize_wide(dead, wide[1], wide[2], weight)
    importance = torch.where(_lost(m2, wide[2]), importance_once, importance)
    bias_delta = torch.where(_lost(mean, wide[1]), bias_delta_once, bias_delta)
    return _out(importance, out_dtype), _out(bias_delta, out_dtype)


def _lost(rounded: torch.Tensor, wide: torch.Tensor) -> torch.Tensor:
    """Where rounding a finite float64 moment overflowed to inf or underflowed below the normal range."""
    underflow = (rounded.abs() < torch.finfo(rounded.dtype).tiny) & (wide != 0)
    return (rounded.isinf() & wide.isfinite()) | underflow


def score(
    x: torch.Tensor, g: torch.Tensor, weight: torch.Tensor, compensate: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Importance and bias shift of every weight of a layer.

    ``compensate=True`` is ECP: ``I = w^2 m2``, ``bias_delta = w mu``. ``compensate=False`` is the
    uncompensated (OBD-style) error ``I = w^2 sum_s c a^2`` with ``bias_delta = 0``.
    """
    shape = check_score_inputs("ecp.score", x, g, weight)
    out_dtype = result_dtype(x, g, weight)
    if compensate:
        return _compensated_score(x, g, weight, out_dtype)
    a = x.reshape(shape.n, shape.fan_in).to(torch.float64)
    c = _sensitivity(g)
    raw_second_moment = c.T @ a.square()
    # A dead row is zero by convention even where a NaN input would make 0 * NaN = NaN.
    dead = _dead(c.sum(dim=0)).unsqueeze(1)
    importance = torch.where(dead, 0.0, weight.to(torch.float64).square() * raw_second_moment)
    return _out(importance, out_dtype), torch.zeros(importance.shape, dtype=out_dtype, device=importance.device)


def gram(
    a: torch.Tensor, b: torch.Tensor | None = None, weight: torch.Tensor | None = None, float64: bool = False
) -> torch.Tensor:
    """``H = sum_s w_s [a_s; 1] [b_s; 1]^T``, shape ``(in_a + 1, in_b + 1)``, the constant 1 last.

    ``b=None`` means ``b = a``; ``weight=None`` means ``w_s = 1``. Extra leading dimensions are
    samples. float32 result, float64 when an input is float64 or ``float64=True``.
    """
    shape = check_gram_inputs("ecp.gram", a, b, weight)
    out_dtype = torch.float64 if float64 else result_dtype(a, b, weight)
    ones = torch.ones(shape.n, 1, dtype=torch.float64, device=a.device)
    left = torch.cat([a.reshape(shape.n, shape.in_a).to(torch.float64), ones], dim=1)
    right = left if b is None else torch.cat([b.reshape(shape.n, shape.in_b).to(torch.float64), ones], dim=1)
    if weight is not None:
        left = left * weight.to(torch.float64).unsqueeze(1)
    return _out(left.T @ right, out_dtype)


# --------------------------------------------------------------------------------------------------
# Sensitivities by autograd and the exact non-linear quantity, for small networks.
# --------------------------------------------------------------------------------------------------


class LayerGradients(NamedTuple):
    """What ECP needs of one layer: its inputs ``x`` ``(N, in)`` and gradients ``g`` ``(m, N, out)``."""

    x: torch.Tensor
    g: torch.Tensor


def sensitivities(
    model: nn.Module, inputs: torch.Tensor, layers: Iterable[str] | None = None
) -> dict[str, LayerGradients]:
    """Exact Jacobian rows ``dy_k/dz`` of every ``nn.Linear`` (or the named ones), per sample.

    One backward pass per model output ``k`` (readable, not fast; the pruner batches this). The
    model must treat samples independently (no batch norm in training mode), so that the gradient
    of ``sum_s y_k^s`` with respect to ``z^s`` is the per-sample gradient.
    """
    names = set(layers) if layers is not None else None
    captured: dict[str, dict[str, torch.Tensor]] = {}
    handles = []

    def make_hook(name: str):
        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            captured[name] = {"x": args[0].detach(), "z": output}

        return hook

    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and (names is None or name in names):
            handles.append(module.register_forward_hook(make_hook(name)))
    try:
        with torch.enable_grad():
            y = model(inputs)
    finally:
        for handle in handles:
            handle.remove()
    if names is not None and names - captured.keys():
        raise ValueError(f"sensitivities: layers {sorted(names - captured.keys())} are not nn.Linear modules that ran")
    y = y.reshape(y.shape[0], -1)
    zs = [captured[name]["z"] for name in captured]
    per_output = []
    for k in range(y.shape[1]):
        grads = torch.autograd.grad(y[:, k].sum(), zs, retain_graph=True, allow_unused=True)
        per_output.append([torch.zeros_like(z) if gz is None else gz for gz, z in zip(grads, zs, strict=True)])
    result = {}
    for index, name in enumerate(captured):
        x = captured[name]["x"]
        g = torch.stack([grads[index] for grads in per_output])
        result[name] = LayerGradients(x=x.reshape(-1, x.shape[-1]), g=g.reshape(g.shape[0], -1, g.shape[-1]).detach())
    return result


class ExactError(NamedTuple):
    """Exact output error of removing each weight of one layer, with and without the best bias shift."""

    error: torch.Tensor  # min over delta of sum_s ||y^s(w_ij = 0, b_i + delta) - y^s||^2, (out, in)
    bias_delta: torch.Tensor  # the minimising delta, (out, in)
    error_uncompensated: torch.Tensor  # the same error at delta = 0, (out, in)


def exact_compensated_error(model: nn.Module, inputs: torch.Tensor, layer: str, newton_steps: int = 8) -> ExactError:
    """The non-linear per-weight quantity of docs/method.md, by Newton's method on the bias shift.

    For every weight ``(i, j)`` of the ``nn.Linear`` named ``layer``: zero it, then minimise the
    squared change of the network output over ``delta`` added to ``b_i``, starting from 0. All
    weights are processed at once with ``torch.func.vmap``; cost is ``out * in * newton_steps``
    forward passes of the whole calibration batch, so keep networks and batches small.
    """
    from torch.func import functional_call, grad, vmap

    modules = dict(model.named_modules())
    if layer not in modules or not isinstance(modules[layer], nn.Linear):
        raise ValueError(
            f"exact_compensated_error: argument 'layer' must name an nn.Linear of the model, got {layer!r}"
        )
    target = modules[layer]
    if target.bias is None:
        raise ValueError(f"exact_compensated_error: layer {layer!r} has no bias to compensate with")
    params = {name: p.detach() for name, p in model.named_parameters()}
    weight_key, bias_key = f"{layer}.weight", f"{layer}.bias"
    with torch.no_grad():
        reference_output = model(inputs)
    fan_out, fan_in = target.weight.shape

    def output_error(delta: torch.Tensor, row: torch.Tensor, col: torch.Tensor) -> torch.Tensor:
        removed = torch.zeros(fan_out, fan_in, dtype=delta.dtype)
        removed = removed.index_put((row, col), torch.ones((), dtype=delta.dtype))
        shift = torch.zeros(fan_out, dtype=delta.dtype).index_put((row,), delta)
        local = dict(params)
        local[weight_key] = params[weight_key] * (1 - removed)
        local[bias_key] = params[bias_key] + shift
        return (functional_call(model, local, (inputs,)) - reference_output).square().sum()

    first = grad(output_error)
    second = grad(first)

    def newton(row: torch.Tensor, col: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        delta = torch.zeros((), dtype=params[weight_key].dtype)
        for _ in range(newton_steps):
            curvature = second(delta, row, col)
            # Where the error does not depend on delta (dead neuron) there is nothing to solve.
            step = torch.where(curvature > 0, first(delta, row, col) / curvature.clamp_min(1e-30), 0.0)
            delta = delta - step
        at_zero = output_error(torch.zeros_like(delta), row, col)
        at_best = output_error(delta, row, col)
        # Newton on a non-convex function can wander; never report worse than not compensating.
        better = at_best <= at_zero
        return torch.where(better, at_best, at_zero), torch.where(better, delta, 0.0), at_zero

    rows, cols = torch.meshgrid(torch.arange(fan_out), torch.arange(fan_in), indexing="ij")
    error, bias_delta, uncompensated = vmap(newton)(rows.reshape(-1), cols.reshape(-1))
    return ExactError(
        error=error.reshape(fan_out, fan_in),
        bias_delta=bias_delta.reshape(fan_out, fan_in),
        error_uncompensated=uncompensated.reshape(fan_out, fan_in),
    )
