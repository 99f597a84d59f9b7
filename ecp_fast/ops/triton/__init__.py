"""Fused Triton kernels for ``ecp::moments``, ``ecp::score`` and ``ecp::gram``: the CUDA backend.

``moments``/``score``/``gram`` are the launchers (same contract as the ops). ``register_cuda_kernels``
registers them, and the device-agnostic reference ``finalize``, as the CUDA implementations of
``torch.ops.ecp.*``; ``ecp_fast.ops`` calls it when CUDA is available. Importing this package needs
``triton`` but no GPU. With ``TRITON_INTERPRET=1`` the launchers also run CPU tensors through the
Triton interpreter, which is how the kernels are tested without a GPU.
"""

from __future__ import annotations

import torch

from ecp_fast.ops.triton.launch import gram, interpreter_ready, is_interpreted, moments, score

__all__ = ["gram", "interpreter_ready", "is_interpreted", "moments", "register_cuda_kernels", "score"]

_library: torch.library.Library | None = None


def register_cuda_kernels() -> None:
    """Register the Triton launchers (and reference ``finalize``) as the ``CUDA`` kernels of ``ecp``.

    Idempotent: a second call does nothing. Requires the ``ecp`` op schemas, so it imports
    ``ecp_fast.ops`` (which defines them) when they are not defined yet.
    """
    global _library
    if _library is not None:
        return
    if not hasattr(torch.ops.ecp, "score"):
        import ecp_fast.ops  # noqa: F401  (defines the schemas, and may call back into this function)

        if _library is not None:
            return
    from ecp_fast.ops import reference

    library = torch.library.Library("ecp", "IMPL")
    library.impl("moments", moments, "CUDA")
    library.impl("score", score, "CUDA")
    library.impl("finalize", reference.finalize, "CUDA")
    library.impl("gram", gram, "CUDA")
    _library = library
