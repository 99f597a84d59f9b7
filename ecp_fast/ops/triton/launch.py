"""Python launchers for the Triton kernels, with the contract of ``torch.ops.ecp.moments``/``score``/``gram``.

The contract around the kernels (argument checks, float64 inputs, empty layers, the float64 rescue of
a non-finite result) is :mod:`ecp_fast.ops._entry`'s; this module launches the kernels.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any

import torch
import triton
import triton.language as tl

from ecp_fast.ops import _entry
from ecp_fast.ops._checks import GramShape, LayerShape
from ecp_fast.ops._entry import HALF_DTYPES
from ecp_fast.ops.triton import kernels


def is_interpreted() -> bool:
    """True when ``TRITON_INTERPRET=1``: kernels then run in numpy on CPU tensors (slow; for tests)."""
    return bool(triton.knobs.runtime.interpret)


def interpreter_ready() -> bool:
    """True when the interpreter can run kernels in this process.

    Triton decorates its own ``tl.sum``, ``tl.cdiv``, ... when it is imported, so the interpreter
    only works when ``TRITON_INTERPRET=1`` was already set at ``import triton``.
    """
    from triton.runtime.interpreter import InterpretedFunction

    return is_interpreted() and isinstance(tl.sum, InterpretedFunction)


def autotune_enabled() -> bool:
    """Autotune on the GPU unless ``ECP_FAST_TRITON_AUTOTUNE=0`` (then one fixed configuration)."""
    return os.environ.get("ECP_FAST_TRITON_AUTOTUNE", "1") != "0"


def _check_device(op: str, x: torch.Tensor, interpret: bool) -> None:
    if interpret and not interpreter_ready():
        raise RuntimeError(
            f"{op}: TRITON_INTERPRET=1 was set after triton was imported; set it before the first "
            "import of triton (or of ecp_fast on a CUDA machine)"
        )
    if not interpret and x.device.type != "cuda":
        raise ValueError(
            f"{op}: the Triton kernels need CUDA tensors (or TRITON_INTERPRET=1 to run CPU tensors "
            f"through the interpreter), got argument 'x' on {x.device}"
        )


_INT32_MAX = 2**31 - 1
# Largest BLOCK_N of any configuration: bounds the in-tile sample offsets.
_MAX_BLOCK_N = max(
    [config.kwargs["BLOCK_N"] for config in kernels.AUTOTUNE_CONFIGS] + [kernels.INTERPRETER_BLOCKS["BLOCK_N"]]
)


def _int32_offsets(t: torch.Tensor, row_span: int, col_span: int) -> torch.Tensor:
    """``t`` itself when the kernel's int32 in-tile offsets cannot overflow on it, else a contiguous copy.

    ``row_span``/``col_span`` are how many rows and columns one tile reaches (the kernel adds
    ``row * stride(0) + col * stride(1)`` in int32 and advances 64-bit pointers between chunks).
    """
    reach = (row_span - 1) * t.stride(-2) + (col_span - 1) * t.stride(-1)
    return t if reach <= _INT32_MAX else t.contiguous()


def _n_bucket(n: int) -> int:
    """Autotuning key for the sample count: the next power of two, so each batch size is not retuned."""
    return triton.next_power_of_2(max(n, 1))


def _launch_gradients(g: torch.Tensor, shape: LayerShape) -> tuple[torch.Tensor, int, bool]:
    """``g`` as ``(P, N, out)`` with 32-bit offsets; many Jacobian rows are reduced to ``c`` first."""
    gradients = g if g.dim() == 3 else g.unsqueeze(0)
    n_probes, g_is_sensitivity = shape.p, False
    if n_probes > kernels.MAX_UNROLLED_PROBES:
        # Many Jacobian rows: reduce them once (an (N, out) float32 tensor, P times smaller than g).
        gradients = gradients.float().square().sum(dim=0, keepdim=True)
        n_probes, g_is_sensitivity = 1, True
    return _int32_offsets(gradients, _MAX_BLOCK_N, shape.fan_out), n_probes, g_is_sensitivity


def _precision(x: torch.Tensor, g: torch.Tensor) -> tuple[bool, str]:
    """Whether the dots run on bf16 operands, and Triton's input precision for float32 ones.

    Half-precision layers run the dots on bf16 operands (tensor cores); anything with a float32
    input keeps float32 operands, on TF32 tensor cores only where torch allows TF32 for matmuls.
    """
    both_half = x.dtype in HALF_DTYPES and g.dtype in HALF_DTYPES
    if both_half:
        return True, "tf32"  # Triton's default; only float32 operands read it
    return False, "tf32" if torch.backends.cuda.matmul.allow_tf32 else "ieee"


def _column_shift(built: Any, samples: torch.Tensor, shape: LayerShape, interpret: bool) -> torch.Tensor:
    """The per-column shift (mean of the first rows) that keeps ``m2`` precise, from the pre-pass kernel."""
    shift = torch.empty(shape.fan_in, device=samples.device, dtype=torch.float32)
    shift_blocks = kernels.INTERPRETER_SHIFT_BLOCKS if interpret else kernels.SHIFT_BLOCKS
    built.column_shift[(triton.cdiv(shape.fan_in, shift_blocks["BLOCK_IN"]),)](
        samples,
        shift,
        min(shape.n, kernels.SHIFT_ROWS),
        shape.fan_in,
        samples.stride(0),
        samples.stride(1),
        **shift_blocks,
    )
    return shift


def _launch(
    op: str,
    shape: LayerShape,
    x: torch.Tensor,
    g: torch.Tensor,
    weight: torch.Tensor | None,
    compensate: bool,
    outputs: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
) -> None:
    """Run the shift pre-pass (when compensating) and the fused kernel into ``outputs``."""
    interpret = is_interpreted()
    _check_device(op, x, interpret)
    built = kernels.build_kernels(interpret, autotune_enabled())
    s0, first, second = outputs
    samples = x.reshape(shape.n, shape.fan_in)  # a view whenever the leading dims allow one
    samples = _int32_offsets(samples, _MAX_BLOCK_N, shape.fan_in)
    gradients, n_probes, g_is_sensitivity = _launch_gradients(g, shape)
    if weight is not None:
        weight = _int32_offsets(weight, shape.fan_out, shape.fan_in)
    both_half, input_precision = _precision(x, g)

    with torch.cuda.device(x.device) if x.device.type == "cuda" else contextlib.nullcontext():
        shift = _column_shift(built, samples, shape, interpret) if compensate else s0  # s0: not read
        w = weight if weight is not None else first  # not read by the moments kernel
        tensors = (samples, gradients, w, shift, s0, first, second)
        sizes = (shape.n, shape.fan_in, shape.fan_out)
        strides = (*samples.stride(), *gradients.stride(), *w.stride())
        arguments = (*tensors, *sizes, *strides, _n_bucket(shape.n))
        flags = dict(
            N_PROBES=n_probes,
            G_IS_SENSITIVITY=g_is_sensitivity,
            SCORE=weight is not None,
            COMPENSATE=compensate,
            DOT_BF16=both_half,
            UPCAST_DOT=interpret,
            INPUT_PRECISION=input_precision,
        )

        def grid(meta: dict) -> tuple[int]:
            return (triton.cdiv(shape.fan_out, meta["BLOCK_OUT"]) * triton.cdiv(shape.fan_in, meta["BLOCK_IN"]),)

        if interpret:
            built.weighted_moments[grid](*arguments, **flags, **kernels.INTERPRETER_BLOCKS)
        else:
            built.weighted_moments[grid](*arguments, **flags)


def moments(x: torch.Tensor, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(s0, mean, m2)`` as :func:`ecp_fast.ops.reference.moments`, by the fused Triton kernel.

    ``x`` is ``(..., in)``, ``g`` is ``(N, out)`` or ``(P, N, out)``, any strides. Outputs are
    float32 and contiguous; float64 inputs run the float64 reference instead.
    """
    return _entry.moments(x, g, _launch)


def score(
    x: torch.Tensor, g: torch.Tensor, weight: torch.Tensor, compensate: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(importance, bias_delta)`` as :func:`ecp_fast.ops.reference.score`, by the fused Triton kernel.

    ``compensate=True`` gives ``w^2 m2`` and ``w mean``; ``compensate=False`` gives
    ``w^2 sum_s c x^2`` and zeros. Outputs are float32 ``(out, in)``; float64 inputs run the
    float64 reference instead.
    """
    return _entry.score(x, g, weight, compensate, _launch)


def gram(
    a: torch.Tensor, b: torch.Tensor | None = None, weight: torch.Tensor | None = None, float64: bool = False
) -> torch.Tensor:
    """``H = sum_s w_s [a_s; 1] [b_s; 1]^T`` as :func:`ecp_fast.ops.reference.gram`, by the Triton kernel.

    float32 accumulation and output; float64 inputs, or ``float64=True``, run the float64 reference.
    """
    return _entry.gram(a, b, weight, float64, _launch_gram)


def _launch_gram(
    shape: GramShape, a: torch.Tensor, b: torch.Tensor | None, weight: torch.Tensor | None, h: torch.Tensor
) -> None:
    """Launch the Gram kernel into ``h`` (the kernel's offsets are 64-bit, so any strides are fine)."""
    interpret = is_interpreted()
    _check_device("ecp.gram", a, interpret)
    built = kernels.build_kernels(interpret, autotune_enabled())
    left = a.reshape(shape.n, shape.in_a)  # a view whenever the leading dims allow one
    right = left if b is None else b.reshape(shape.n, shape.in_b)
    # Half inputs without weights multiply exactly in their own dtype on tensor cores (float32 sums);
    # weighted bf16 inputs as a hi/lo bf16 split (weighted float16 would underflow: float32 FMAs).
    same_half = left.dtype in HALF_DTYPES and right.dtype == left.dtype
    native = same_half and (weight is None or left.dtype == torch.bfloat16)
    input_precision = "tf32" if torch.backends.cuda.matmul.allow_tf32 else "ieee"
    w = weight if weight is not None else h  # not read without weights
    arguments = (
        left,
        right,
        w,
        h,
        shape.n,
        shape.in_a,
        shape.in_b,
        left.stride(0),
        left.stride(1),
        right.stride(0),
        right.stride(1),
        w.stride(0) if weight is not None else 0,
        _n_bucket(shape.n),
    )
    flags = {
        "HAS_WEIGHT": weight is not None,
        "DOT_NATIVE": native,
        "UPCAST_DOT": interpret,
        "INPUT_PRECISION": input_precision,
    }

    def grid(meta: dict) -> tuple[int]:
        return (triton.cdiv(shape.in_a + 1, meta["BLOCK_A"]) * triton.cdiv(shape.in_b + 1, meta["BLOCK_B"]),)

    with torch.cuda.device(a.device) if a.device.type == "cuda" else contextlib.nullcontext():
        if interpret:
            built.gram[grid](*arguments, **flags, **kernels.INTERPRETER_GRAM_BLOCKS)
        else:
            built.gram[grid](*arguments, **flags)
