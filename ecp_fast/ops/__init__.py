"""The ``ecp`` custom ops: their contract, fake kernels and typed Python wrappers.

The native library (``csrc/``, loaded by :mod:`ecp_fast.ops._native`) declares the op schemas
itself (``TORCH_LIBRARY(ecp)``) beside its CPU kernels, so it also works from C++ and TorchScript
without Python. Backends:

* CPU tensors: the fused multithreaded C++ kernels, or, when they are not built (or
  ``ECP_FAST_DISABLE_NATIVE=1``), the reference implementation with a warning; the schemas then come
  from :data:`SCHEMAS`, the Python copy of the C++ ones (a test checks that they agree).
* CUDA tensors: the backend :func:`use_cuda_backend` selects (:mod:`ecp_fast.ops.cuda`): the fused
  Triton kernels of :mod:`ecp_fast.ops.triton` by default where triton imports, or the library GEMMs
  of :mod:`ecp_fast.ops.gemm` (``ECP_FAST_CUDA_BACKEND=gemm``, and without triton).
* Meta / FakeTensor: the fake kernels below, so ``torch.compile`` and shape propagation work.

All ops return sums over samples (docs/method.md), in float32, or float64 for float64 inputs. A NaN input
makes NaN every statistic it enters (a neuron is dead only when its ``s0`` is exactly zero); inputs
so large that float32 sums overflow (about 1e19 and above) are summed again in float64 and rounded,
so the result is the reference's (an infinity only where the value exceeds float32's range).

The ops have no derivative: an input that requires grad while grad mode is on is refused with an
error naming it (detach it, or call under ``torch.no_grad()``).
"""

from __future__ import annotations

import logging
import warnings

import torch

from ecp_fast.ops import _native, reference
from ecp_fast.ops._checks import (
    check_bool,
    check_finalize_inputs,
    check_gram_inputs,
    check_layer_inputs,
    check_score_inputs,
    check_tensor,
    grad_message,
    result_dtype,
)
from ecp_fast.ops.cuda import cuda_backend, default_cuda_backend, use_cuda_backend
from ecp_fast.ops.merge import Moments, merge_moments

logger = logging.getLogger(__name__)

__all__ = [
    "CUDA_BACKEND",
    "Moments",
    "NATIVE_CPU",
    "SCHEMAS",
    "TRITON_CUDA",
    "cuda_backend",
    "finalize",
    "gram",
    "merge_moments",
    "moments",
    "score",
    "use_cuda_backend",
]

#: The op schemas, as csrc/register.cpp declares them. Used only when the native library is not
#: loaded, so that the reference fallback keeps working; tests/ops/test_native_build.py checks that
#: the C++ declarations equal these strings.
SCHEMAS = {
    "moments": "moments(Tensor x, Tensor g) -> (Tensor s0, Tensor mean, Tensor m2)",
    "score": "score(Tensor x, Tensor g, Tensor weight, bool compensate=True) -> (Tensor importance, Tensor bias_delta)",
    "finalize": "finalize(Tensor s0, Tensor mean, Tensor m2, Tensor weight) -> (Tensor importance, Tensor bias_delta)",
    "gram": "gram(Tensor a, Tensor? b=None, Tensor? weight=None, bool float64=False) -> Tensor",
}


def _refuse_grad_inputs(name: str):
    """``setup_context`` that refuses inputs requiring grad, like csrc/register.cpp's Autograd kernel.

    torch calls it only when grad mode is on and an input requires grad, during the forward call.
    """
    arguments = [argument.name for argument in getattr(torch.ops.ecp, name).default._schema.arguments]

    def setup_context(ctx, inputs: tuple, output) -> None:
        for argument, value in zip(arguments, inputs, strict=True):
            if isinstance(value, torch.Tensor) and value.requires_grad:
                raise RuntimeError(grad_message(f"ecp.{name}", argument))

    return setup_context


def _no_backward(ctx, *grads):  # never reached: setup_context refuses first
    raise RuntimeError("the ecp ops have no derivative")


def _declare_missing_ops() -> torch.library.Library:
    """Define from :data:`SCHEMAS` every op the native library did not, with the reference kernels.

    Also covers a stale native build that predates an op: its kernels keep serving the ops it has.
    """
    library = torch.library.Library("ecp", "FRAGMENT")
    for name, schema in SCHEMAS.items():
        if not hasattr(torch.ops.ecp, name):
            library.define(schema)
            torch.library.register_autograd(f"ecp::{name}", _no_backward, setup_context=_refuse_grad_inputs(name))
        if not torch._C._dispatch_has_kernel_for_dispatch_key(f"ecp::{name}", "CPU"):
            library.impl(name, getattr(reference, name), "CPU")
    return library


NATIVE_CPU = _native.load()
_fallback_library = _declare_missing_ops()


# ---- fake kernels: shapes and dtypes only, contiguous like the real kernels' outputs -------------


@torch.library.register_fake("ecp::moments")
def _moments_fake(x: torch.Tensor, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    shape = check_layer_inputs("ecp.moments", x, g)
    dtype = result_dtype(x, g)
    return (
        x.new_empty((shape.fan_out,), dtype=dtype),
        x.new_empty((shape.fan_out, shape.fan_in), dtype=dtype),
        x.new_empty((shape.fan_out, shape.fan_in), dtype=dtype),
    )


@torch.library.register_fake("ecp::score")
def _score_fake(
    x: torch.Tensor, g: torch.Tensor, weight: torch.Tensor, compensate: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    shape = check_score_inputs("ecp.score", x, g, weight)
    dtype = result_dtype(x, g, weight)
    size = (shape.fan_out, shape.fan_in)
    return x.new_empty(size, dtype=dtype), x.new_empty(size, dtype=dtype)


@torch.library.register_fake("ecp::finalize")
def _finalize_fake(
    s0: torch.Tensor, mean: torch.Tensor, m2: torch.Tensor, weight: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    check_finalize_inputs("ecp.finalize", s0, mean, m2, weight)
    dtype = result_dtype(s0, mean, m2, weight)
    return weight.new_empty(weight.shape, dtype=dtype), weight.new_empty(weight.shape, dtype=dtype)


@torch.library.register_fake("ecp::gram")
def _gram_fake(
    a: torch.Tensor, b: torch.Tensor | None = None, weight: torch.Tensor | None = None, float64: bool = False
) -> torch.Tensor:
    shape = check_gram_inputs("ecp.gram", a, b, weight)
    dtype = torch.float64 if float64 else result_dtype(a, b, weight)
    return a.new_empty((shape.in_a + 1, shape.in_b + 1), dtype=dtype)


# ---- backends ------------------------------------------------------------------------------------


def _select_cuda_backend() -> str | None:
    """Select the backend of the ops on CUDA tensors when CUDA is present (see :mod:`ecp_fast.ops.cuda`):
    the default, or the GEMM backend when the default cannot load; None (with a warning) when neither."""
    if not torch.cuda.is_available():
        return None
    failures = []
    for name in dict.fromkeys((default_cuda_backend(), "gemm")):
        try:
            use_cuda_backend(name)
            break
        except Exception as error:  # a broken GPU stack must not make the CPU package unusable
            failures.append(f"{name}: {type(error).__name__}: {error}")
    if failures:
        outcome = f"they run on {cuda_backend()!r}" if cuda_backend() else "ecp ops on CUDA tensors are unavailable"
        warnings.warn(
            f"ecp_fast: selecting a CUDA backend failed ({'; '.join(failures)}); {outcome}.",
            RuntimeWarning,
            stacklevel=2,
        )
    return cuda_backend()


#: The backend of the ops on CUDA tensors chosen at import (None without CUDA); it does not follow later
#: ``use_cuda_backend`` calls: ``cuda_backend()`` gives the one in use.
CUDA_BACKEND = _select_cuda_backend()
TRITON_CUDA = CUDA_BACKEND == "triton"


# ---- typed wrappers ------------------------------------------------------------------------------


def moments(x: torch.Tensor, g: torch.Tensor) -> Moments:
    """Sensitivity-weighted moments ``(s0, mean, m2)`` of a layer's inputs, one fused pass.

    Args:
        x: layer inputs ``(N, in)``; extra leading dimensions are more samples.
        g: output gradients ``(N, out)``, or ``(P, N, out)`` with sensitivity ``c = sum_p g_p^2``.

    Returns:
        ``Moments(s0 (out,), mean (out, in), m2 (out, in))``; mergeable with :func:`merge_moments`.
    """
    check_tensor("ecp.moments", "x", x)
    check_tensor("ecp.moments", "g", g)
    return Moments(*torch.ops.ecp.moments.default(x, g))


def score(
    x: torch.Tensor, g: torch.Tensor, weight: torch.Tensor, compensate: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Importance and optimal bias shift of every weight of a layer, one fused pass.

    With ``compensate=True`` (ECP) ``importance = w^2 m2`` and ``bias_delta = w mean``; with
    ``compensate=False`` ``importance = w^2 sum_s c a^2`` and ``bias_delta`` is zeros.
    Both outputs are ``(out, in)``.
    """
    for name, value in (("x", x), ("g", g), ("weight", weight)):
        check_tensor("ecp.score", name, value)
    check_bool("ecp.score", "compensate", compensate)
    importance, bias_delta = torch.ops.ecp.score.default(x, g, weight, compensate)
    return importance, bias_delta


def finalize(
    s0: torch.Tensor, mean: torch.Tensor, m2: torch.Tensor, weight: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Importance and bias shift from accumulated moments (after streaming or merging)."""
    for name, value in (("s0", s0), ("mean", mean), ("m2", m2), ("weight", weight)):
        check_tensor("ecp.finalize", name, value)
    importance, bias_delta = torch.ops.ecp.finalize.default(s0, mean, m2, weight)
    return importance, bias_delta


def gram(
    a: torch.Tensor, b: torch.Tensor | None = None, weight: torch.Tensor | None = None, *, float64: bool = False
) -> torch.Tensor:
    """Sample-weighted Gram matrix of bias-augmented inputs, one streaming pass over the samples.

    ``H = sum_s w_s [a_s; 1] [b_s; 1]^T`` of shape ``(in_a + 1, in_b + 1)``, the constant 1 last: the
    quadratic of layer-wise reconstruction (Optimal Brain Surgeon, SparseGPT; docs/method.md,
    "compensation by reconstruction").

    Args:
        a: inputs of the layer ``(N, in_a)``; extra leading dimensions are more samples.
        b: a second stream of the same ``N`` samples ``(N, in_b)`` (for instance the dense network's
            inputs to the layer, for the cross term with the pruned network's ``a``); ``None`` means
            ``b = a``, and ``H`` is then symmetric.
        weight: per-sample weights ``(N,)``, for example the row mean of the sensitivities; ``None``
            means 1. Meant to be non-negative (not checked: negative weights give an indefinite ``H``).
        float64: accumulate and return in float64 (otherwise float32, or float64 when an input is).

    Returns:
        ``H`` ``(in_a + 1, in_b + 1)``, contiguous. Grams of disjoint sets of samples add:
        ``gram(a1) + gram(a2)`` equals ``gram(torch.cat([a1, a2]))``, so calibration can stream
        batches into a running sum, and ranks merge with ``torch.distributed.all_reduce`` (SUM).
    """
    check_tensor("ecp.gram", "a", a)
    for name, value in (("b", b), ("weight", weight)):
        if value is not None:
            check_tensor("ecp.gram", name, value)
    check_bool("ecp.gram", "float64", float64)
    return torch.ops.ecp.gram.default(a, b, weight, float64)
