"""Compact files of pruned models: only the nonzeros of sparse weights, with the smallest index dtypes.

The file is a ``torch.save`` archive of plain containers and tensors, so it loads with
``torch.load(..., weights_only=True)`` (no code is unpickled)::

    {"format": "ecp_fast.compact", "version": 1,
     "dense": {state_dict key: tensor},            # what would not be smaller as CSR
     "csr":   {state_dict key: {"shape": [d0, d1, ...], "crow_indices": int tensor,
                                "col_indices": int tensor, "values": tensor}}}

Keys are those of ``export(model, "dense").state_dict()`` (masks folded). A weight of shape
``(d0, d1, ...)`` is stored as the CSR form of its ``(d0, d1 * ...)`` view when that takes fewer
bytes; indices use ``uint8`` / ``int16`` / ``int32`` where they fit (a 784-input layer needs 2 bytes
per column index), and are widened again on loading.
"""

from __future__ import annotations

import copy
import io
import logging
import os
from typing import IO, Any, Union

import torch
from torch import nn

from ecp_fast.export.csr import quiet_csr_warning, replace_csr_with_dense
from ecp_fast.export.formats import FORMATS, _check_arguments, _convert, copy_model, export, fold_masks
from ecp_fast.pruning.masks import parameter_holders, untie

logger = logging.getLogger(__name__)

COMPACT_FORMAT = "ecp_fast.compact"
COMPACT_VERSION = 1
_CSR_KEYS = ("shape", "crow_indices", "col_indices", "values")

PathOrFile = Union[str, "os.PathLike[str]", IO[bytes]]


def smallest_index_dtype(largest: int) -> torch.dtype:
    """The narrowest integer dtype torch can store that holds ``0..largest``."""
    for dtype in (torch.uint8, torch.int16, torch.int32):
        if largest <= torch.iinfo(dtype).max:
            return dtype
    return torch.int64


def _encode(tensor: torch.Tensor) -> dict[str, Any] | None:
    """The CSR record of a floating tensor of 2+ dimensions, or None when dense storage is smaller."""
    if not tensor.is_floating_point() or tensor.dim() < 2 or tensor.layout != torch.strided:
        return None
    matrix = tensor.detach().reshape(tensor.shape[0], -1)
    nonzeros = int(torch.count_nonzero(matrix))
    col_dtype = smallest_index_dtype(max(matrix.shape[1] - 1, 0))
    crow_dtype = smallest_index_dtype(nonzeros)
    itemsize = tensor.element_size()
    sparse_bytes = (
        nonzeros * (itemsize + torch.empty((), dtype=col_dtype).element_size())
        + (matrix.shape[0] + 1) * torch.empty((), dtype=crow_dtype).element_size()
    )
    if sparse_bytes >= matrix.numel() * itemsize:
        return None
    with quiet_csr_warning():
        csr = matrix.to_sparse_csr()
    return {
        "shape": list(tensor.shape),
        "crow_indices": csr.crow_indices().to(crow_dtype),
        "col_indices": csr.col_indices().to(col_dtype),
        "values": csr.values().clone(),
    }


def _check_path(value: Any, argument: str, mode: str) -> None:
    method = "write" if mode == "w" else "read"
    if not isinstance(value, (str, os.PathLike)) and not callable(getattr(value, method, None)):
        raise TypeError(
            f"argument {argument!r} must be a path (str or os.PathLike) or a binary file object with "
            f".{method}(), got {type(value).__name__}"
        )


def save_compact(model: nn.Module, path: PathOrFile) -> int:
    """Write ``model`` (pruned, dense or CSR-exported) to ``path`` storing only the nonzeros of sparse weights.

    Returns the number of bytes written. ``model`` is not changed. Load with :func:`load_compact`.

    Raises:
        TypeError: ``model`` is not a module or ``path`` neither a path nor a writable binary file.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"argument 'model' must be a torch.nn.Module, got {type(model).__name__}")
    _check_path(path, "path", "w")
    state = export(model, "dense").state_dict()
    dense: dict[str, Any] = {}
    sparse: dict[str, dict[str, Any]] = {}
    for key, tensor in state.items():
        if not isinstance(tensor, torch.Tensor):  # a module's extra state (get_extra_state): kept as it is
            dense[key] = copy.deepcopy(tensor)
            continue
        if tensor.layout != torch.strided or type(tensor) not in (torch.Tensor, nn.Parameter):
            tensor = tensor.to_dense()  # semi-structured (2:4) or other sparse weights
        record = _encode(tensor)
        if record is None:
            dense[key] = tensor.detach().clone()
        else:
            sparse[key] = record
    payload = {"format": COMPACT_FORMAT, "version": COMPACT_VERSION, "dense": dense, "csr": sparse}
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    data = buffer.getvalue()
    if isinstance(path, (str, os.PathLike)):
        with open(path, "wb") as handle:
            handle.write(data)
    else:
        path.write(data)
    logger.info("wrote %d bytes: %d tensors as CSR, %d dense", len(data), len(sparse), len(dense))
    return len(data)


def _describe(path_or_file: PathOrFile) -> str:
    return repr(os.fspath(path_or_file)) if isinstance(path_or_file, (str, os.PathLike)) else "the file object"


def _read(path_or_file: PathOrFile, map_location: Any) -> dict[str, Any]:
    """The validated payload of a compact file; ``ValueError`` (not a pickle traceback) for anything else."""
    source = _describe(path_or_file)
    if isinstance(map_location, str):  # a device name; torch.load takes devices, dicts and callables too
        try:
            torch.device(map_location)
        except (RuntimeError, ValueError):
            raise ValueError(
                f"argument 'map_location' must name a device (or be as torch.load takes), got {map_location!r}"
            ) from None
    try:
        payload = torch.load(path_or_file, map_location=map_location, weights_only=True)
    except OSError:
        raise  # a missing or unreadable path: the OS error says it best
    except Exception as error:  # torch.load raises many types for a damaged file
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ValueError(
            f"argument 'path_or_file': {source} is not a readable ecp_fast compact file "
            f"({type(error).__name__}: {reason[:200]})"
        ) from None
    if not isinstance(payload, dict) or payload.get("format") != COMPACT_FORMAT:
        raise ValueError(
            f"argument 'path_or_file': {source} is a torch file but not an ecp_fast compact file "
            f"(no format={COMPACT_FORMAT!r} entry); write it with ecp_fast.export.save_compact"
        )
    version = payload.get("version")
    if not isinstance(version, int) or version > COMPACT_VERSION:
        raise ValueError(
            f"argument 'path_or_file': {source} has compact format version {version!r}; "
            f"this ecp_fast reads version {COMPACT_VERSION} and below"
        )
    if not isinstance(payload.get("dense"), dict) or not isinstance(payload.get("csr"), dict):
        raise ValueError(f"argument 'path_or_file': {source} is damaged: 'dense' and 'csr' must be dictionaries")
    return payload


def _decode(key: str, record: Any) -> torch.Tensor:
    """The dense tensor of one CSR record, its arrays checked (a damaged file must not crash a kernel)."""
    if not isinstance(record, dict) or any(name not in record for name in _CSR_KEYS):
        raise ValueError(f"argument 'path_or_file': the CSR record of {key!r} is damaged (expected keys {_CSR_KEYS})")
    shape = record["shape"]
    try:
        columns = 1
        for extent in shape[1:]:
            columns *= int(extent)
        with quiet_csr_warning():
            matrix = torch.sparse_csr_tensor(
                record["crow_indices"].long(),
                record["col_indices"].long(),
                record["values"],
                (int(shape[0]), columns),
                check_invariants=True,
            )
        return matrix.to_dense().reshape([int(extent) for extent in shape])
    except (RuntimeError, TypeError, ValueError, IndexError, AttributeError) as error:
        raise ValueError(f"argument 'path_or_file': the CSR record of {key!r} is damaged ({error})") from None


def _untie_differing(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Give every holder of a tied parameter its own copy where ``state`` holds different values for them.

    An export folds a mask on one holder of a tied weight into a copy (:func:`fold_masks`), so the
    file may hold an embedding and a pruned head that a tied template would load into one tensor:
    the last key would silently overwrite the others.
    """
    for group in parameter_holders(model).values():
        tensors = [state.get(key) for key in group.values()]
        if len(group) < 2 or not all(isinstance(tensor, torch.Tensor) for tensor in tensors):
            continue
        if all(torch.equal(tensors[0], tensor) for tensor in tensors[1:]):  # type: ignore[arg-type]
            continue
        for module, name in group:
            untie(module, name)
        logger.warning(
            "the file holds different values for the tied parameters %s: they are untied", list(group.values())
        )


def _load_into(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """``model.load_state_dict(state)``, adding a bias the file has but the template lacks (compensation adds one)."""
    _untie_differing(model, state)
    modules = dict(model.named_modules())
    for key, tensor in state.items():
        owner, _, name = key.rpartition(".")
        module = modules.get(owner)
        if name == "bias" and module is not None and getattr(module, "bias", False) is None:
            weight = module.weight  # the bias takes the template's dtype, as every loaded tensor does
            module.bias = nn.Parameter(torch.zeros_like(tensor, device=weight.device, dtype=weight.dtype))
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as error:
        raise ValueError(f"argument 'model_template' does not fit the file: {error}") from None


def load_compact(
    path_or_file: PathOrFile,
    model_template: nn.Module,
    format: str = "csr",
    *,
    max_density: float | None = None,
    example_inputs: Any = None,
    map_location: Any = "cpu",
) -> nn.Module:
    """Load a file of :func:`save_compact` into a copy of ``model_template``, exported to ``format``.

    Args:
        path_or_file: the file (path or binary file object).
        model_template: a model of the same architecture (pruned or not; its weights are replaced).
            It is not changed.
        format, max_density, example_inputs: as for :func:`ecp_fast.export.export`.
        map_location: as for ``torch.load``.

    Raises:
        TypeError: an argument of the wrong type.
        ValueError: the file is not a compact file or is damaged, or ``model_template`` does not fit it.
        FileNotFoundError: no file at the path.
    """
    _check_path(path_or_file, "path_or_file", "r")
    if not isinstance(model_template, nn.Module):
        raise TypeError(f"argument 'model_template' must be a torch.nn.Module, got {type(model_template).__name__}")
    _check_arguments(model_template, format, max_density, example_inputs)
    payload = _read(path_or_file, map_location)
    state = dict(payload["dense"])
    for key, record in payload["csr"].items():
        state[key] = _decode(key, record)
    model = copy_model(model_template)
    fold_masks(model)
    replace_csr_with_dense(model)
    _load_into(model, state)
    _convert(model, format, max_density, example_inputs)
    return model


__all__ = ["COMPACT_FORMAT", "COMPACT_VERSION", "FORMATS", "load_compact", "save_compact", "smallest_index_dtype"]
