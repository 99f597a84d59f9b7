"""Fused Triton kernels for ``ecp::moments``, ``ecp::score`` and ``ecp::gram``: a CUDA backend.

``moments``/``score``/``gram`` are the launchers (same contract as the ops). ``register_cuda_kernels``
selects them for ``torch.ops.ecp.*`` on CUDA tensors (:mod:`ecp_fast.ops.cuda`; the other backend is
:mod:`ecp_fast.ops.gemm`); ``ecp_fast.ops`` selects them at import when CUDA and triton are present.
Importing this package needs ``triton`` but no GPU. With ``TRITON_INTERPRET=1`` the launchers also
run CPU tensors through the Triton interpreter, which is how the kernels are tested without a GPU.
"""

from __future__ import annotations

from ecp_fast.ops.triton.launch import gram, interpreter_ready, is_interpreted, moments, score

__all__ = ["gram", "interpreter_ready", "is_interpreted", "moments", "register_cuda_kernels", "score"]


def register_cuda_kernels() -> None:
    """Run the ops on CUDA tensors with these Triton kernels: ``ecp_fast.ops.use_cuda_backend("triton")``
    (registering the ops' CUDA kernels the first time; works without a GPU, and may be repeated)."""
    from ecp_fast.ops.cuda import use_cuda_backend

    use_cuda_backend("triton")
