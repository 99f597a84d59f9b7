"""Loads the native library (``ecp_fast/_C*.so``): the ``ecp`` op schemas and their CPU kernels."""

from __future__ import annotations

import glob
import logging
import os
import warnings

import torch

logger = logging.getLogger(__name__)

# The extension is built as ecp_fast._C, at the top of the package.
_PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def library_path() -> str | None:
    """Path of the built extension next to this package, or None when it was not built.

    The newest one when several are there: a build of another flavour (``_C.abi3.so`` beside an
    older ``_C.cpython-311-*.so``) leaves the previous file behind.
    """
    candidates = glob.glob(os.path.join(_PACKAGE_DIR, "_C*.so"))
    return max(candidates, key=os.path.getmtime) if candidates else None


def load() -> bool:
    """Load the native CPU kernels; warn (do not crash) and return False when they are missing.

    ``ECP_FAST_DISABLE_NATIVE=1`` skips loading, which makes CPU tensors use the reference kernels.
    """
    if os.environ.get("ECP_FAST_DISABLE_NATIVE") == "1":
        logger.info("ECP_FAST_DISABLE_NATIVE=1: using the reference kernels for CPU tensors")
        return False
    path = library_path()
    if path is None:
        warnings.warn(
            "ecp_fast: the native CPU kernels are not built (no ecp_fast/_C*.so); CPU tensors fall "
            "back to the slow reference implementation. Build them with "
            "`pip install --no-build-isolation -e .` (see README).",
            RuntimeWarning,
            stacklevel=3,
        )
        return False
    try:
        torch.ops.load_library(path)
    except OSError as error:  # built against another torch, for example
        warnings.warn(
            f"ecp_fast: could not load the native CPU kernels from {path} ({error}); CPU tensors fall "
            "back to the reference implementation. Rebuild with `pip install --no-build-isolation -e .`.",
            RuntimeWarning,
            stacklevel=3,
        )
        return False
    return True
