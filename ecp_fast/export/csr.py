"""CSR export of pruned ``nn.Linear`` layers: plain-torch modules that multiply with torch's sparse kernels.

A pruned Linear becomes a ``torch.fx.GraphModule`` named ``SparseCSRLinear`` whose parameters are the
three CSR arrays of the weight (``weight_crow_indices``, ``weight_col_indices``, ``weight_values``)
and the ``bias``, and whose generated ``forward`` computes ``y = (W_csr @ x^T)^T + b`` with
``torch.addmm`` (MKL's sparse x dense product on CPU). Why this design:

- **It loads without ecp_fast.** A pickled GraphModule carries its own generated code, which only
  names ``torch``; ``torch.save(model)`` then ``torch.load(path, weights_only=False)`` works in a
  process that never imports ecp_fast. A module class defined here would not.
- **The weight is three dense tensors, not a sparse tensor,** rebuilt each call with
  ``aten._sparse_csr_tensor_unsafe`` (about 1 microsecond): torch 2.13 cannot ``deepcopy`` a CSR
  tensor, and the state dict then holds only strided tensors (``weights_only`` loads work).
- **They are parameters (``requires_grad=False``), not buffers:** unpickling re-traces the code, and
  fx turns buffers into frozen constants but keeps parameters live.
- **Not ``nn.Linear`` with a CSR weight:** ``F.linear(x, W_csr)`` takes torch's dense x sparse^T path,
  measured 2-5x slower than ``W_csr @ x^T`` here, and fails under ``torch.inference_mode``.

CSR pays only below a density that depends on the shape (and batch); :func:`modelled_max_density`
is the modelled crossover, :func:`choose_csr_layers` can also measure it on example inputs.
"""

from __future__ import annotations

import contextlib
import logging
import operator
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx, nn
from torch.nn.utils.prune import BasePruningMethod

from ecp_fast._arguments import check_module
from ecp_fast.export.measure import MEASURE_MARGIN as MEASURE_MARGIN  # re-exported: it was defined here
from ecp_fast.export.measure import capture_layer_inputs, faster, time_forms
from ecp_fast.export.measure import check_example_inputs as check_example_inputs  # re-exported, likewise
from ecp_fast.pruning.masks import weight_reparametrization

logger = logging.getLogger(__name__)

#: Class name of the exported CSR layer (a GraphModule; ``type(module).__name__`` may read "GraphModule").
CSR_CLASS_NAME = "SparseCSRLinear"
#: Parameter names of an exported CSR layer, in the order of torch's CSR constructor.
CSR_PARAMETERS = ("weight_crow_indices", "weight_col_indices", "weight_values")
#: torch's CPU kernel (``addmm_out_sparse_csr_impl_mkl``) implements float32 and float64 only.
CSR_DTYPES = (torch.float32, torch.float64)
#: Below this many weights a layer stays dense: the CSR layer's extra calls (about 10 us of Python
#: and dispatch) outweigh the product (measured: 10x100 0.3-0.8x at every density and batch; 100x300
#: at density 0.1: 0.4x at batch 1, 0.9x at 16, 1.9-2.0x at 64-256).
MIN_CSR_WEIGHTS = 65_536
#: Layers of at least this many weights amortise the sparse kernel's set-up even at batch 1.
LARGE_LAYER_WEIGHTS = 1 << 20
#: Modelled crossover densities (see :func:`modelled_max_density`).
MAX_DENSITY_MEDIUM = 0.10
MAX_DENSITY_LARGE = 0.15
#: Layers denser than this are never timed: CSR lost to dense above it at every measured shape.
MEASURE_MAX_DENSITY = 0.5


@contextlib.contextmanager
def quiet_csr_warning() -> Iterator[None]:
    """Silence torch's once-per-process "sparse CSR support is in beta" warning for library-internal use."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        yield


def modelled_max_density(out_features: int, in_features: int) -> float:
    """Largest weight density at which a CSR layer of this shape is modelled to beat dense (CPU, float32).

    From ``bench/export_report.py --sweep`` (a CSR layer against ``nn.Linear``, one thread, batches
    1-256): below :data:`MIN_CSR_WEIGHTS` weights never (returns 0); up to 1M weights 0.10 (300x784
    at 0.10: 2.4-2.8x faster at batch >= 16, 0.86x at batch 1); from 1M weights 0.15 (at 0.10:
    2.0-10x at every batch; at 0.20: 0.9-2.9x). Batch-1 inference of layers under 1M weights is often
    faster dense: measure with ``example_inputs``, or override with ``max_density``.
    """
    for name, value in (("out_features", out_features), ("in_features", in_features)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"argument {name!r} must be a non-negative integer, got {value!r}")
    weights = out_features * in_features
    if weights < MIN_CSR_WEIGHTS:
        return 0.0
    return MAX_DENSITY_LARGE if weights >= LARGE_LAYER_WEIGHTS else MAX_DENSITY_MEDIUM


def _index_dtype(*extents: int) -> torch.dtype:
    # int32 indices: torch accepts int32 or int64 CSR, and int32 measured 1.1-1.4x faster.
    return torch.int32 if max(extents) < 2**31 - 1 else torch.int64


def _frozen(tensor: torch.Tensor) -> nn.Parameter:
    return nn.Parameter(tensor, requires_grad=False)


def _csr_graph(in_features: int, out_features: int, has_bias: bool) -> fx.Graph:
    """``input (..., in) -> (W_csr @ input_2d^T)^T + bias -> (..., out)`` as an fx graph."""
    graph = fx.Graph()
    inputs = graph.placeholder("input")
    crow, col, values = (graph.get_attr(name) for name in CSR_PARAMETERS)
    # The aten op takes tensors (torch.sparse_csr_tensor takes array-likes and cannot be re-traced).
    # dtype and device are read from the values at each call, so that model.double() / .to(device) work.
    options: dict[str, fx.node.Argument] = {
        "dtype": graph.call_function(getattr, (values, "dtype")),
        "device": graph.call_function(getattr, (values, "device")),
    }
    weight = graph.call_function(
        torch.ops.aten._sparse_csr_tensor_unsafe.default, (crow, col, values, [out_features, in_features]), options
    )
    # (W @ x^T)^T: the CSR matrix must be the left operand of torch's fast sparse x dense product.
    columns = graph.call_method("t", (graph.call_method("reshape", (inputs, -1, in_features)),))
    if has_bias:
        bias_column = graph.call_method("unsqueeze", (graph.get_attr("bias"), 1))
        product = graph.call_function(torch.addmm, (bias_column, weight, columns))
    else:
        product = graph.call_function(torch.mm, (weight, columns))
    leading = graph.call_function(operator.getitem, (graph.call_function(getattr, (inputs, "shape")), slice(None, -1)))
    shape = graph.call_function(operator.add, (leading, (out_features,)))
    graph.output(graph.call_method("reshape", (graph.call_method("t", (product,)), shape)))
    return graph


def csr_linear(linear: nn.Linear) -> fx.GraphModule:
    """A ``SparseCSRLinear`` GraphModule computing ``linear`` (its current, mask-folded weight) with a CSR weight.

    The new layer takes ``linear``'s training mode, not its hooks or a weight re-parametrisation
    (:func:`csr_obstacle` says whether ``linear`` has any; :func:`replace_with_csr` leaves such layers dense).

    Raises:
        TypeError: ``linear`` is not an ``nn.Linear``.
        ValueError: its weight is not float32 / float64 (torch's CPU CSR kernels support no other).
    """
    if not isinstance(linear, nn.Linear):
        raise TypeError(f"argument 'linear' must be an nn.Linear, got {type(linear).__name__}")
    weight = linear.weight.detach()
    if weight.dtype not in CSR_DTYPES:
        raise ValueError(f"argument 'linear': CSR export needs a float32 or float64 weight, got {weight.dtype}")
    with quiet_csr_warning():
        sparse = weight.to_sparse_csr()
    index_dtype = _index_dtype(sparse.values().numel(), linear.in_features)
    root = nn.Module()
    root.weight_crow_indices = _frozen(sparse.crow_indices().to(index_dtype))
    root.weight_col_indices = _frozen(sparse.col_indices().to(index_dtype))
    root.weight_values = _frozen(sparse.values().clone())
    if linear.bias is not None:
        root.bias = _frozen(linear.bias.detach().clone())
    module = fx.GraphModule(
        root, _csr_graph(linear.in_features, linear.out_features, linear.bias is not None), class_name=CSR_CLASS_NAME
    )
    shape = {"in_features": linear.in_features, "out_features": linear.out_features}
    for name, value in shape.items():
        setattr(module, name, value)
    # GraphModule.__deepcopy__ keeps only attributes listed here (pickling keeps them all).
    module.meta["_user_preserved_attributes"] = shape
    module.train(linear.training)  # a new module starts in training mode; an eval-mode export must stay eval
    return module


def is_csr_linear(module: nn.Module) -> bool:
    """True for a layer produced by :func:`csr_linear` (also after ``torch.load`` without ecp_fast)."""
    return isinstance(module, fx.GraphModule) and all(hasattr(module, name) for name in CSR_PARAMETERS)


def csr_weight(module: nn.Module) -> torch.Tensor:
    """The weight of a CSR layer as a torch sparse CSR tensor of shape ``(out, in)``."""
    if not is_csr_linear(module):
        raise TypeError(f"argument 'module' must be a {CSR_CLASS_NAME} layer, got {type(module).__name__}")
    crow, col, values = (getattr(module, name).detach() for name in CSR_PARAMETERS)
    in_features = _csr_in_features(module)
    with quiet_csr_warning():
        return torch.sparse_csr_tensor(crow, col, values, (crow.numel() - 1, in_features), check_invariants=True)


def _csr_in_features(module: nn.Module) -> int:
    """The input size of a CSR layer: its ``in_features``, or, where a copy lost that attribute (a layer
    loaded by ``torch.load`` keeps it, but not its ``meta``, so a deep copy of it drops it), the size
    its graph builds the CSR weight with."""
    value = getattr(module, "in_features", None)
    if isinstance(value, int):
        return value
    graph = module.graph
    assert isinstance(graph, fx.Graph)  # is_csr_linear: a GraphModule
    for node in graph.nodes:
        if node.target is torch.ops.aten._sparse_csr_tensor_unsafe.default:
            return int(node.args[3][1])
    raise TypeError(f"argument 'module': a {CSR_CLASS_NAME} layer without a CSR weight in its graph")


def dense_linear(module: nn.Module) -> nn.Linear:
    """The ``nn.Linear`` a CSR layer computes (the inverse of :func:`csr_linear`)."""
    weight = csr_weight(module).to_dense()
    bias = getattr(module, "bias", None)
    linear = nn.Linear(
        weight.shape[1], weight.shape[0], bias=bias is not None, device=weight.device, dtype=weight.dtype
    )
    with torch.no_grad():
        linear.weight.copy_(weight)
        if bias is not None:
            linear.bias.copy_(bias)
    linear.train(module.training)
    return linear


def csr_obstacle(linear: nn.Module) -> str | None:
    """Why replacing ``linear`` by a CSR layer would change what the model computes, or None.

    A CSR layer is built from the weight as it is now: a weight re-parametrisation (the hooks of the
    old-style ``weight_norm`` / ``spectral_norm``, which recompute ``weight`` at every call, or a
    ``torch.nn.utils.parametrize`` one) would be frozen, possibly stale; and the layer's own hooks
    would be lost (:func:`csr_linear` does not carry them over). Pruning-mask hooks do not count: the
    CSR weight is the masked one.
    """
    kind = weight_reparametrization(linear)
    if kind is not None:
        return f"its weight is re-parametrised ({kind}), which a CSR copy of the weight would freeze"
    pre_hooks = [hook for hook in linear._forward_pre_hooks.values() if not isinstance(hook, BasePruningMethod)]
    kinds = [
        kind
        for kind, hooks in (
            ("forward pre-hooks", pre_hooks),
            ("forward hooks", linear._forward_hooks),
            ("backward hooks", linear._backward_hooks),
            ("backward pre-hooks", linear._backward_pre_hooks),
        )
        if hooks
    ]
    if kinds:
        return f"it has {', '.join(kinds)}: layer hooks of a replaced Linear are not carried over to its CSR form"
    return None


@dataclass(frozen=True)
class LayerChoice:
    """Which format one Linear layer gets, and why."""

    name: str
    shape: tuple[int, int]
    density: float
    csr: bool
    reason: str
    dense_seconds: float | None = None
    csr_seconds: float | None = None


def density_of(linear: nn.Linear) -> float:
    """Fraction of nonzero weights."""
    weight = linear.weight.detach()
    return float(torch.count_nonzero(weight)) / max(weight.numel(), 1)


def replaceable_linears(model: nn.Module) -> dict[str, nn.Linear]:
    """``{name: layer}`` of the plain ``nn.Linear`` layers that may be replaced.

    Subclasses and attention projections stay: ``nn.MultiheadAttention`` reads ``out_proj.weight``
    directly instead of calling the module, and a subclass may override ``forward``; replacing either
    would change what the model computes.
    """
    skip = {
        id(child)
        for module in model.modules()
        if isinstance(module, nn.MultiheadAttention)
        for child in module.modules()
    }
    return {
        name: module for name, module in model.named_modules() if type(module) is nn.Linear and id(module) not in skip
    }


def _choose_one(
    name: str, linear: nn.Linear, max_density: float | None, inputs: torch.Tensor | None, rounds: int
) -> LayerChoice:
    shape = (linear.out_features, linear.in_features)
    density = density_of(linear)
    obstacle = csr_obstacle(linear)
    if obstacle is not None:
        logger.warning("layer %r stays dense: %s", name, obstacle)
        return LayerChoice(name, shape, density, False, obstacle)
    if linear.weight.dtype not in CSR_DTYPES:
        return LayerChoice(name, shape, density, False, f"dtype {linear.weight.dtype} has no CPU CSR kernel")
    if max_density is not None:
        return LayerChoice(name, shape, density, density <= max_density, f"max_density={max_density:g}")
    if inputs is None and linear.weight.device.type != "cpu":
        # The model was fitted to CPU timings; GPU GEMMs move the crossover far out. Ask, don't guess.
        return LayerChoice(
            name, shape, density, False, "modelled crossover is for CPU: pass max_density or example_inputs"
        )
    if inputs is None:
        limit = modelled_max_density(*shape)
        return LayerChoice(name, shape, density, density <= limit, f"modelled crossover {limit:g}")
    if density > MEASURE_MAX_DENSITY:
        return LayerChoice(name, shape, density, False, f"density above {MEASURE_MAX_DENSITY:g}, not timed")
    dense_seconds, csr_seconds = time_forms(linear, csr_linear(linear), inputs, rounds)
    return LayerChoice(
        name,
        shape,
        density,
        faster(dense_seconds, csr_seconds),
        f"measured on input {tuple(inputs.shape)}",
        dense_seconds,
        csr_seconds,
    )


def choose_csr_layers(
    model: nn.Module,
    max_density: float | None = None,
    example_inputs: Any = None,
    rounds: int = 11,
) -> dict[str, LayerChoice]:
    """Decide, for every replaceable ``nn.Linear`` of a mask-folded ``model``, whether CSR is faster.

    Args:
        model: a model whose masks are folded (plain weights with zeros).
        max_density: if given, CSR exactly for the layers of density at most this (0..1).
        example_inputs: if given (not with ``max_density``: both are refused, as
            :func:`~ecp_fast.export.export` refuses them), a tensor or tuple of positional
            arguments for ``model``: each layer is timed dense and CSR on the input it receives
            (``rounds`` interleaved rounds, minimum); CSR wins when at least
            :data:`~ecp_fast.export.measure.MEASURE_MARGIN` (10%) faster.
        rounds: timing rounds per layer when measuring.

    Without either, the modelled crossover :func:`modelled_max_density` decides (CPU layers only;
    layers on another device then stay dense). The model was fitted to batches of 16 and more: at
    batch 1 small layers (under about 1M weights) can be slower as CSR, which ``example_inputs`` of
    batch 1 would detect.

    Raises:
        TypeError: ``max_density`` is not a number (a bool is not); ``example_inputs`` (when measuring) is
            not a tensor or tuple.
        ValueError: ``max_density`` outside [0, 1]; the model does not run on ``example_inputs``.
    """
    check_module(model)
    if max_density is not None and (isinstance(max_density, bool) or not isinstance(max_density, (int, float))):
        raise TypeError(f"argument 'max_density' must be a float in [0, 1] or None, got {type(max_density).__name__}")
    if max_density is not None and not 0.0 <= max_density <= 1.0:
        raise ValueError(f"argument 'max_density' must be a number in [0, 1] or None, got {max_density!r}")
    if max_density is not None and example_inputs is not None:  # as export refuses it: one would be ignored
        raise ValueError("arguments 'max_density' and 'example_inputs' exclude each other; pass one of them")
    linears = replaceable_linears(model)
    measuring = example_inputs is not None and max_density is None
    inputs = capture_layer_inputs(model, linears, example_inputs) if measuring else {}
    choices = {
        name: _choose_one(name, linear, max_density, inputs.get(name), rounds) for name, linear in linears.items()
    }
    if measuring:
        for name in linears.keys() - inputs.keys():
            logger.info("layer %r did not run on example_inputs; its choice is the modelled one", name)
    return choices


def _set_submodule(model: nn.Module, path: str, module: nn.Module) -> None:
    parent_path, _, child = path.rpartition(".")
    setattr(model.get_submodule(parent_path) if parent_path else model, child, module)


def replace_with_csr(model: nn.Module, names: Sequence[str]) -> None:
    """Replace the named ``nn.Linear`` layers of ``model`` (in place) by CSR layers.

    A layer reached by several paths (a shared module) is converted once and stays shared. A named
    layer with hooks or a re-parametrised weight (:func:`csr_obstacle`) stays dense, with a logged warning.
    """
    wanted = set(names)
    converted: dict[int, fx.GraphModule] = {}
    refused: set[int] = set()
    for path, module in list(model.named_modules(remove_duplicate=False)):
        if not path or not isinstance(module, nn.Linear) or id(module) in refused:
            continue
        if path in wanted and id(module) not in converted:
            obstacle = csr_obstacle(module)
            if obstacle is not None:
                logger.warning("layer %r stays dense: %s", path, obstacle)
                refused.add(id(module))
                continue
            converted[id(module)] = csr_linear(module)
        if id(module) in converted:
            _set_submodule(model, path, converted[id(module)])


def replace_csr_with_dense(model: nn.Module) -> int:
    """Replace every CSR layer of ``model`` (in place) by the ``nn.Linear`` it computes; returns how many."""
    replaced: dict[int, nn.Linear] = {}
    for path, module in list(model.named_modules(remove_duplicate=False)):
        if path and is_csr_linear(module):
            if id(module) not in replaced:
                replaced[id(module)] = dense_linear(module)
            _set_submodule(model, path, replaced[id(module)])
    return len(replaced)
