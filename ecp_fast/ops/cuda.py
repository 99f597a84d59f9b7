"""Which backend runs ``torch.ops.ecp.*`` on CUDA tensors: the fused Triton kernels or library GEMMs.

Two backends have the ops' contract on CUDA: ``"triton"`` (:mod:`ecp_fast.ops.triton`, fused kernels,
needs the ``triton`` package) and ``"gemm"`` (:mod:`ecp_fast.ops.gemm`, float32-output cuBLAS GEMMs
per chunk of samples, no extra package). One set of CUDA kernels is registered for the ops; each call
goes to the backend selected now, so :func:`use_cuda_backend` switches at any time.

``ecp_fast.ops`` selects one at import when CUDA is available: ``ECP_FAST_CUDA_BACKEND`` if set, else
``"triton"`` where triton imports, else ``"gemm"`` (with a warning). On an H200 the fused kernels ran
at 24-29% of cuBLAS (docs/gpu.md); the GEMM backend has not been measured on a GPU yet.
"""

from __future__ import annotations

import os
import warnings
from types import ModuleType

import torch

#: The backends, by name.
CUDA_BACKENDS = ("triton", "gemm")

_selected: str | None = None
_library: torch.library.Library | None = None


def cuda_backend() -> str | None:
    """The backend the ops use on CUDA tensors, or None before one is selected (no CUDA at import)."""
    return _selected


def _backend_module(name: str) -> ModuleType:
    if name == "triton":
        try:
            from ecp_fast.ops import triton as module
        except ImportError as error:
            raise ImportError(
                f"argument 'name': the 'triton' CUDA backend needs the triton package ({error}); "
                "install triton, or use_cuda_backend('gemm')"
            ) from error
        return module
    from ecp_fast.ops import gemm

    return gemm


def use_cuda_backend(name: str) -> None:
    """Run the ops on CUDA tensors with backend ``name`` (one of :data:`CUDA_BACKENDS`) from now on.

    Registers the ops' CUDA kernels the first time (that works without a GPU too). Raises
    ``ValueError`` for an unknown name and ``ImportError`` for ``"triton"`` without triton.
    """
    global _selected
    if not isinstance(name, str) or name not in CUDA_BACKENDS:
        raise ValueError(f"argument 'name' must be one of {CUDA_BACKENDS}, got {name!r}")
    _backend_module(name)  # fails here, before anything changes, when the backend cannot load
    _selected = name
    _register()


def _current() -> ModuleType:
    return _backend_module(_selected or "triton")


def _moments(x: torch.Tensor, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _current().moments(x, g)


# The schemas' defaults again: the dispatcher leaves out trailing arguments equal to their defaults.
def _score(
    x: torch.Tensor, g: torch.Tensor, weight: torch.Tensor, compensate: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    return _current().score(x, g, weight, compensate)


def _gram(
    a: torch.Tensor, b: torch.Tensor | None = None, weight: torch.Tensor | None = None, float64: bool = False
) -> torch.Tensor:
    return _current().gram(a, b, weight, float64)


def _register() -> None:
    """Register the routing functions (and the reference ``finalize``) as the CUDA kernels, once."""
    global _library
    if _library is not None:
        return
    if not hasattr(torch.ops.ecp, "score"):
        import ecp_fast.ops  # noqa: F401  (defines the schemas, and may call back into this module)

        if _library is not None:
            return
    from ecp_fast.ops import reference

    library = torch.library.Library("ecp", "IMPL")
    library.impl("moments", _moments, "CUDA")
    library.impl("score", _score, "CUDA")
    library.impl("finalize", reference.finalize, "CUDA")
    library.impl("gram", _gram, "CUDA")
    _library = library


def default_cuda_backend() -> str:
    """``ECP_FAST_CUDA_BACKEND`` when set to a backend's name (any case; an empty value is unset, any
    other value is ignored with a ``RuntimeWarning``), else ``"triton"`` where it imports, else
    ``"gemm"`` with a ``RuntimeWarning`` that says why."""
    chosen = os.environ.get("ECP_FAST_CUDA_BACKEND", "").strip().lower()
    if chosen in CUDA_BACKENDS:
        return chosen
    if chosen:
        warnings.warn(
            f"ecp_fast: ECP_FAST_CUDA_BACKEND must be one of {CUDA_BACKENDS}, got "
            f"{os.environ['ECP_FAST_CUDA_BACKEND']!r}; it is ignored",
            RuntimeWarning,
            stacklevel=3,
        )
    try:
        _backend_module("triton")
    except Exception as error:  # not only ImportError: a broken triton install raises what it raises
        warnings.warn(
            f"ecp_fast: the Triton kernels could not be imported ({error.__cause__ or error}); ecp ops on CUDA "
            "tensors run on library GEMMs (ecp_fast.ops.gemm) instead. Install triton for the fused kernels.",
            RuntimeWarning,
            stacklevel=3,
        )
        return "gemm"
    return "triton"
