"""Structured ECP: remove whole hidden neurons with bias compensation and shrink the model.

Zeros make a model neither smaller nor faster; removing a hidden neuron does. A hidden neuron ``j``
sits between a *producer* Linear (row ``j`` of its weight and its bias entry ``j``), optional
per-feature modules (``BatchNorm1d``, ``LayerNorm`` and ``PReLU`` entries ``j``, element-wise
activations, dropout) and a *consumer* Linear (column ``j`` of its weight). Removing it with every
row of the consumer compensated, ``b_i += w_ij mu_ij``, costs to first order (docs/structured.md)

    S_j = sum_i w_ij^2 M2_ij

with the consumer's calibrated moments ``(s0, mean, m2)`` (docs/method.md); it is the sum over the rows
of the unstructured ECP importance of column ``j``. The methods:

* ``"ecp"``: ``S_j`` from the pruner's statistics (output sensitivities ``c``), compensated.
* ``"local"``: the same with ``c = 1`` (the layer reconstructs its own output): the variance score
  with mean compensation of FLAP / VBP, ``sum_i w_ij^2 * sum_s (a_j - mean_j)^2``; compensated.
* ``"obd"``: uncompensated, ``sum_i w_ij^2 sum_s c_i a_j^2``, no bias change.
* ``"norm"``: ``||W_consumer[:, j]||_2``, no bias change (``"magnitude"`` is an alias).
* ``"norm_io"``: ``||W_consumer[:, j]||_2 * ||(W_producer[j, :], b_producer[j])||_2``, no bias change.

::

    pruner = Pruner(model, sensitivity="output")
    pruner.calibrate(batches)
    report = prune_neurons(pruner, 0.5, method="ecp", scope="layer")   # model shrinks in place
    print(report)

Nothing touches the model until every score, selection and new module is computed; a failure
leaves the model exactly as it was. The result holds only plain ``torch.nn`` modules (and Hugging
Face ``Conv1D`` where GPT-2-style layers were shrunk). Gated MLPs (SwiGLU) are refused.
"""

from __future__ import annotations

import itertools
import logging
import math
import numbers
import warnings
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn.utils import prune as torch_prune

from ecp_fast._arguments import check_module
from ecp_fast._deprecation import renamed_keyword
from ecp_fast.ops import finalize
from ecp_fast.pruning.batches import call_model, eval_mode, module_device, split_batch, to_device
from ecp_fast.pruning.calibration import (
    SENSITIVITIES,
    Calibrator,
    LayerStatistics,
    LossFn,
    existing_mask,
    resolve_layers,
    weight_2d,
    weight_parameter,
)
from ecp_fast.pruning.layers import LayerSpec, is_transposed_linear, layer_kind, tied_weights
from ecp_fast.pruning.masks import copy_model
from ecp_fast.pruning.pruner import Pruner, register_neuron_pruning
from ecp_fast.pruning.transaction import model_transaction

logger = logging.getLogger(__name__)

#: Structured scores offered by :func:`neuron_scores` and :func:`prune_neurons`.
METHODS = ("ecp", "local", "obd", "norm", "norm_io")
#: Alternative names accepted for a method.
METHOD_ALIASES = {"magnitude": "norm"}
#: Methods that shift the consumer's bias by default.
COMPENSATING = ("ecp", "local")
#: Methods that read calibration statistics.
NEEDS_STATISTICS = ("ecp", "local", "obd")
#: Selection scopes: one ranking over every hidden unit, or the same ratio in every hidden layer.
SELECTION_SCOPES = ("global", "layer")
NORMALIZATIONS = ("auto", "none", "mean")

#: Modules that act on each feature separately and have no per-feature parameters.
ELEMENTWISE = (
    nn.ReLU,
    nn.ReLU6,
    nn.LeakyReLU,
    nn.GELU,
    nn.SiLU,
    nn.Tanh,
    nn.Sigmoid,
    nn.ELU,
    nn.SELU,
    nn.CELU,
    nn.Softplus,
    nn.Mish,
    nn.Hardtanh,
    nn.Hardswish,
    nn.Hardsigmoid,
    nn.Tanhshrink,
    nn.Softsign,
    nn.Identity,
    nn.Dropout,
    nn.AlphaDropout,
)
#: Modules with one entry per feature that are sliced with the neuron.
PER_FEATURE = (nn.BatchNorm1d, nn.LayerNorm, nn.PReLU)
#: Child names of MLP blocks detected outside ``nn.Sequential`` (``forward`` is ``second(act(first(x)))``).
BLOCK_NAME_PAIRS = (
    ("fc1", "fc2"),
    ("linear1", "linear2"),
    ("up_proj", "down_proj"),
    ("c_fc", "c_proj"),
    ("dense_h_to_4h", "dense_4h_to_h"),
)


# ---- pairs ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class NeuronPair:
    """A hidden layer: ``producer`` Linear, per-feature modules ``norms`` and ``consumer`` Linear."""

    producer: str
    consumer: str
    norms: tuple[str, ...] = ()


def _feature_count(module: nn.Module) -> int | None:
    """Features of a per-feature module, or None when it acts on every feature alike."""
    if isinstance(module, nn.BatchNorm1d):
        return module.num_features
    if isinstance(module, nn.LayerNorm):
        if len(module.normalized_shape) != 1:
            return -1
        return int(module.normalized_shape[0])
    if isinstance(module, nn.PReLU):
        return None if module.num_parameters == 1 else module.num_parameters
    return None


def _is_dense(module: nn.Module) -> bool:
    """True for an ``nn.Linear`` or a Hugging Face ``Conv1D`` (a Linear with its weight stored ``(in, out)``)."""
    return isinstance(module, nn.Linear) or is_transposed_linear(module)


def _dense_shape(module: nn.Module) -> tuple[int, int]:
    """``(out, in)`` features of an ``nn.Linear`` or a ``Conv1D``."""
    if isinstance(module, nn.Linear):
        return module.out_features, module.in_features
    weight = weight_parameter(module)
    return int(weight.shape[1]), int(weight.shape[0])


def _sequential_pairs(prefix: str, children: list[tuple[str, nn.Module]]) -> list[NeuronPair]:
    """Dense -> element-wise / per-feature modules -> dense chains among the children of an ``nn.Sequential``."""
    pairs: list[NeuronPair] = []
    for index, (name, module) in enumerate(children):
        if not _is_dense(module):
            continue
        hidden = _dense_shape(module)[0]
        norms: list[str] = []
        for next_name, next_module in children[index + 1 :]:
            if _is_dense(next_module):
                if _dense_shape(next_module)[1] == hidden:
                    pairs.append(NeuronPair(prefix + name, prefix + next_name, tuple(norms)))
                break
            if isinstance(next_module, PER_FEATURE):
                features = _feature_count(next_module)
                if features is None:
                    continue
                if features != hidden:
                    break
                norms.append(prefix + next_name)
                continue
            if not isinstance(next_module, ELEMENTWISE):
                break
    return pairs


def _sibling_norms(modules: Mapping[str, nn.Module], pair: NeuronPair) -> tuple[list[str], list[str]]:
    """Per-feature siblings of the hidden size of a pair whose producer and consumer share a parent that
    is not an ``nn.Sequential`` (``forward`` cannot be read): ``(certain, ambiguous)``.

    Such a module (``bn1`` beside ``fc1`` / ``fc2``) can only act on the hidden units, and must be
    sliced with them, unless another tensor of the block has the hidden size too (the producer's input,
    the consumer's output, another dense sibling's): then it is ambiguous.
    """
    parent_name, _, _ = pair.producer.rpartition(".")
    parent = modules.get(parent_name)
    if parent is None or isinstance(parent, nn.Sequential) or pair.consumer.rpartition(".")[0] != parent_name:
        return [], []
    hidden = _dense_shape(modules[pair.producer])[0]
    prefix = f"{parent_name}." if parent_name else ""
    norms: list[str] = []
    sizes: list[int] = []
    for name, module in parent.named_children():
        if _is_dense(module):  # every size but the hidden units' own (producer's output, consumer's input)
            outputs, inputs = _dense_shape(module)
            sizes += [outputs] if prefix + name != pair.producer else []
            sizes += [inputs] if prefix + name != pair.consumer else []
        elif isinstance(module, PER_FEATURE) and _feature_count(module) == hidden:
            norms.append(prefix + name)
    norms = [name for name in norms if name not in pair.norms]
    return ([], norms) if hidden in sizes else (norms, [])


def _chain_norms(modules: Mapping[str, nn.Module], pair: NeuronPair) -> list[str]:
    """Per-feature modules of the hidden size between producer and consumer, children of one ``nn.Sequential``."""
    parent_name, _, first = pair.producer.rpartition(".")
    parent = modules.get(parent_name)
    if not isinstance(parent, nn.Sequential) or pair.consumer.rpartition(".")[0] != parent_name:
        return []
    names = [name for name, _ in parent.named_children()]
    start, stop = names.index(first), names.index(pair.consumer.rpartition(".")[2])
    hidden = _dense_shape(modules[pair.producer])[0]
    prefix = f"{parent_name}." if parent_name else ""
    between = [(prefix + name, parent.get_submodule(name)) for name in names[start + 1 : stop]]
    return [
        name
        for name, module in between
        if isinstance(module, PER_FEATURE) and _feature_count(module) == hidden and name not in pair.norms
    ]


def _with_norms(modules: Mapping[str, nn.Module], pair: NeuronPair) -> NeuronPair:
    """``pair`` with the per-feature modules it certainly feeds added to its norms (they are sliced with it)."""
    extra = [*_chain_norms(modules, pair), *_sibling_norms(modules, pair)[0]]
    return NeuronPair(pair.producer, pair.consumer, (*pair.norms, *extra)) if extra else pair


def _detect_pairs(model: nn.Module) -> list[NeuronPair]:
    """Every pair :func:`find_neuron_pairs` would detect, gated MLPs' and ambiguous ones included."""
    pairs: list[NeuronPair] = []
    modules = dict(model.named_modules())
    for parent_name, parent in modules.items():
        prefix = f"{parent_name}." if parent_name else ""
        children = list(parent.named_children())
        if isinstance(parent, nn.Sequential):
            pairs.extend(_sequential_pairs(prefix, children))
            continue
        named = dict(children)
        for first, second in BLOCK_NAME_PAIRS:
            producer, consumer = named.get(first), named.get(second)
            if (
                producer is not None
                and consumer is not None
                and _is_dense(producer)
                and _is_dense(consumer)
                and _dense_shape(producer)[0] == _dense_shape(consumer)[1]
            ):
                pairs.append(_with_norms(modules, NeuronPair(prefix + first, prefix + second)))
    return pairs


def find_neuron_pairs(model: nn.Module) -> list[NeuronPair]:
    """Hidden layers whose neurons can be removed, in module order.

    Detected: inside every ``nn.Sequential`` (at any depth), a Linear followed by element-wise
    activations, dropout and per-feature ``BatchNorm1d`` / ``LayerNorm`` / ``PReLU`` of the right size,
    then a Linear; and in any other module, child Linears (or Hugging Face ``Conv1D``, as in GPT-2)
    named as in :data:`BLOCK_NAME_PAIRS` (``fc1``/``fc2``, ``linear1``/``linear2``, ``c_fc``/``c_proj``,
    ...) with matching sizes, assumed to compute ``second(activation(first(x)))`` as transformer MLP
    blocks do, with their per-feature siblings of the hidden size as norms (``bn1``). Gated MLPs (a
    sibling gate projection, see :func:`gate_of`) and blocks where such a sibling could act on another
    tensor of the hidden size are left out; anything else: pass ``pairs``.
    """
    check_module(model)
    modules = dict(model.named_modules())
    return [
        pair for pair in _detect_pairs(model) if gate_of(modules, pair) is None and not _sibling_norms(modules, pair)[1]
    ]


def gate_of(modules: Mapping[str, nn.Module], pair: NeuronPair) -> str | None:
    """The name of a sibling of ``pair.producer`` that looks like the gate of a gated MLP, or None.

    In SwiGLU / GeGLU blocks (Llama, Mistral, Qwen, Mixtral, T5 v1.1) the consumer reads
    ``act(gate(x)) * up(x)``: a third projection multiplies the hidden units, so removing a unit
    would need the gate's row removed too. ``forward`` cannot be read, so a gate is recognised by
    shape: a dense sibling (same parent, not an ``nn.Sequential``) with the producer's input and
    output sizes that is named like a gate (``gate_proj``, ...), or the only other dense sibling.
    """
    parent_name, _, _ = pair.producer.rpartition(".")
    parent = modules.get(parent_name)
    producer = modules.get(pair.producer)
    if parent is None or producer is None or isinstance(parent, nn.Sequential) or not _is_dense(producer):
        return None
    prefix = f"{parent_name}." if parent_name else ""
    shape = _dense_shape(producer)
    others = [
        name
        for name, module in parent.named_children()
        if _is_dense(module) and prefix + name not in (pair.producer, pair.consumer)
    ]
    twins = [name for name in others if _dense_shape(parent.get_submodule(name)) == shape]
    named = [name for name in twins if "gate" in name.lower()]
    if named:
        return prefix + named[0]
    # A block of exactly three projections, two of them alike (Mixtral's w1/w3/w2, T5's wi_0/wi_1/wo).
    if len(others) == 1 and twins:
        return prefix + twins[0]
    return None


def _check_pair(modules: Mapping[str, nn.Module], pair: NeuronPair) -> None:
    """Raise ``ValueError`` naming the pair unless its modules exist with matching sizes."""
    for role, name in (("producer", pair.producer), ("consumer", pair.consumer)):
        if name not in modules or name == "":
            linears = [n for n, m in modules.items() if n and _is_dense(m)]
            raise ValueError(
                f"argument 'pairs': no module named {name!r} ({role}); Linear and Conv1D layers are {linears}"
            )
        if not _is_dense(modules[name]):
            raise ValueError(
                f"argument 'pairs': {role} {name!r} must be an nn.Linear or a transformers Conv1D, got "
                f"{type(modules[name]).__name__}"
            )
    hidden, inputs = _dense_shape(modules[pair.producer])[0], _dense_shape(modules[pair.consumer])[1]
    if hidden != inputs:
        raise ValueError(
            f"argument 'pairs': producer {pair.producer!r} has {hidden} outputs but consumer "
            f"{pair.consumer!r} has {inputs} inputs; they must be equal"
        )
    for norm in pair.norms:
        module = modules.get(norm)
        if module is None or not isinstance(module, PER_FEATURE):
            raise ValueError(
                f"argument 'pairs': per-feature module {norm!r} of pair ({pair.producer!r}, {pair.consumer!r}) "
                f"must be a BatchNorm1d, LayerNorm or PReLU, got {type(module).__name__ if module else None}"
            )
        features = _feature_count(module)
        if features is not None and features != hidden:
            raise ValueError(
                f"argument 'pairs': {norm!r} has {features} features, expected {hidden} "
                f"(the outputs of {pair.producer!r})"
            )


def _parse_pair(entry: NeuronPair | Sequence[Any]) -> NeuronPair:
    """One entry of ``pairs`` as a :class:`NeuronPair` (names not checked yet)."""
    if isinstance(entry, NeuronPair):
        return entry
    items = tuple(entry) if hasattr(entry, "__iter__") and not isinstance(entry, str) else ()
    if len(items) not in (2, 3) or not all(isinstance(item, str) for item in items[:2]):
        raise ValueError(
            f"argument 'pairs': each entry must be (producer, consumer) or (producer, consumer, norms), got {entry!r}"
        )
    norm_names = items[2] if len(items) == 3 else ()
    iterable = hasattr(norm_names, "__iter__") and not isinstance(norm_names, str)
    norms = tuple(norm_names) if iterable else (norm_names,)
    if not all(isinstance(norm, str) for norm in norms):
        raise ValueError(f"argument 'pairs': the norms of {entry!r} must be module names (strings)")
    return NeuronPair(items[0], items[1], norms)


def _refuse_unsupported(model: nn.Module, pairs: Sequence[NeuronPair], detected: bool) -> None:
    """Raise ``ValueError`` for a gated MLP or a layer shared with another name (module used twice, tied weight).

    Either would leave the smaller model inconsistent: the gate keeps the old width, and the other
    user of a shared weight keeps the old module or its tie is silently broken.
    """
    source = "argument 'pairs' is None and the detected pair" if detected else "argument 'pairs': pair"
    modules = dict(model.named_modules())
    checked = {
        pair: [pair.producer, pair.consumer, *(n for n in pair.norms if _feature_count(modules[n]))] for pair in pairs
    }
    shared = tied_weights(model, sorted({name for names in checked.values() for name in names}))
    for pair, names in checked.items():
        gate = gate_of(modules, pair)
        if gate is not None:
            others = detected and any(gate_of(modules, other) is None for other in pairs)
            hint = "pass pairs=find_neuron_pairs(model) to prune only the other hidden layers" if others else ""
            raise ValueError(
                f"{source} ({pair.producer!r}, {pair.consumer!r}) belongs to a gated MLP: {gate!r} has the "
                f"producer's shape and its output multiplies the hidden units (act(gate(x)) * up(x)), so removing "
                f"a unit would need the gate's row removed too; gated MLPs (SwiGLU, GeGLU) are not supported"
                + (f"; {hint}" if hint else "")
            )
        for name in names:
            if name in shared:
                raise ValueError(
                    f"{source} ({pair.producer!r}, {pair.consumer!r}): layer {name!r} shares its weight with "
                    f"{', '.join(shared[name])} (a module used twice, or a tied weight); shrinking it would leave "
                    "the other user at the old size or silently untie them. Give each use its own module (or "
                    "untie the weight), or leave the pair out"
                )


def _refuse_ambiguous(modules: Mapping[str, nn.Module], pairs: Sequence[NeuronPair]) -> None:
    """Raise ``ValueError`` for a detected pair with a per-feature sibling that may or may not act on its units."""
    for pair in pairs:
        ambiguous = _sibling_norms(modules, pair)[1]
        if ambiguous:
            hidden = _dense_shape(modules[pair.producer])[0]
            raise ValueError(
                f"argument 'pairs' is None and the detected pair ({pair.producer!r}, {pair.consumer!r}) has "
                f"per-feature siblings {ambiguous} of its hidden size {hidden}, and another tensor of the block has "
                "that size too: whether they act on the hidden units (and must be sliced with them) cannot be told. "
                f"Pass pairs=[({pair.producer!r}, {pair.consumer!r}, {tuple(ambiguous)!r})] if they do, else "
                f"pairs=[({pair.producer!r}, {pair.consumer!r})] (find_neuron_pairs(model) lists the other pairs)"
            )


def _resolve_detected(model: nn.Module, producers: Collection[str] | None) -> list[NeuronPair]:
    """The detected pairs (whose producer is in ``producers``, when given), refused as :func:`resolve_pairs` says."""
    detected = _detect_pairs(model)
    if producers is not None:
        kept = [pair for pair in detected if pair.producer in producers]
        if detected and not kept:
            raise ValueError(
                "arguments 'layers' / 'exclude' (of the Pruner): hidden units are removed only where the producer "
                f"is one of the pruner's layers, expected one among the detected pairs "
                f"{[(pair.producer, pair.consumer) for pair in detected]}, got layers {sorted(producers)}"
            )
        detected = kept
    _refuse_unsupported(model, detected, detected=True)
    _refuse_ambiguous(dict(model.named_modules()), detected)
    if not detected:
        raise ValueError(
            "argument 'pairs': no Linear -> activation -> Linear chain found in the model; "
            "pass pairs=[(producer_name, consumer_name), ...]"
        )
    return detected


def resolve_pairs(
    model: nn.Module,
    pairs: Sequence[NeuronPair | Sequence[Any]] | None = None,
    *,
    producers: Collection[str] | None = None,
) -> list[NeuronPair]:
    """Validate ``pairs`` (``(producer, consumer)`` or ``(producer, consumer, norms)``) or detect them.

    A given pair gets the per-feature modules it certainly feeds added to its norms, as a detected one
    has them: those between producer and consumer in one ``nn.Sequential``, and siblings of the hidden
    size that nothing else of the block could feed (``bn1`` beside ``fc1`` / ``fc2``). ``producers``
    (with ``pairs=None``) keeps only the detected pairs whose producer is among them (a Pruner's layers).

    Raises ``ValueError`` naming the pair when a name is missing, a module is not an ``nn.Linear``
    or ``Conv1D`` (or a supported per-feature module), sizes do not match, a layer appears twice in
    one role, a layer is shared with another name (module used twice, tied weight), the pair is
    part of a gated MLP, or a detected pair has a sibling norm that may or may not act on its units
    (detected ones included: then nothing is pruned).
    """
    if pairs is None:
        return _resolve_detected(model, producers)
    if isinstance(pairs, (str, NeuronPair)) or not hasattr(pairs, "__iter__"):
        raise TypeError(f"argument 'pairs' must be a sequence of (producer, consumer) pairs, got {pairs!r}")
    modules = dict(model.named_modules())
    resolved: list[NeuronPair] = []
    for entry in pairs:
        pair = _parse_pair(entry)
        _check_pair(modules, pair)
        resolved.append(_with_norms(modules, pair))
    for role in ("producer", "consumer"):
        names = [getattr(pair, role) for pair in resolved]
        duplicates = sorted({name for name in names if names.count(name) > 1})
        if duplicates:
            raise ValueError(f"argument 'pairs': layers {duplicates} appear more than once as {role}")
    if not resolved:
        raise ValueError("argument 'pairs' must name at least one (producer, consumer) pair, got an empty sequence")
    _refuse_unsupported(model, resolved, detected=False)
    return resolved


# ---- scores --------------------------------------------------------------------------------------


@dataclass
class NeuronScore:
    """Scores of one hidden layer: ``score`` ``(H,)`` (small = remove first) and, for compensating
    methods, ``bias_delta`` ``(out_consumer, H)``: the shift of each consumer row per removed neuron."""

    pair: NeuronPair
    score: torch.Tensor
    bias_delta: torch.Tensor | None


def _canonical_method(method: str) -> str:
    if not isinstance(method, str):
        raise TypeError(f"argument 'method' must be a string, got {type(method).__name__}")
    method = METHOD_ALIASES.get(method, method)
    if method not in METHODS:
        raise ValueError(f"argument 'method' must be one of {METHODS} (or {sorted(METHOD_ALIASES)}), got {method!r}")
    return method


def _local_statistics(
    model: nn.Module, consumers: list[str], batches: Iterable[Any] | None
) -> dict[str, LayerStatistics]:
    """Moments with ``c = 1`` of the consumers' inputs (no backward pass)."""
    if batches is None:
        raise ValueError(
            "method 'local' needs calibration batches: pass batches=..., or a Pruner calibrated with "
            "sensitivity='local' or with re-iterable batches"
        )
    calibrator = Calibrator(model, resolve_layers(model, consumers), sensitivity="local", keep_inputs=False)
    return calibrator.run(batches, progress=False).statistics


def _fill_silent_rows(
    bias_delta: torch.Tensor, s0: torch.Tensor, mean: torch.Tensor, weight: torch.Tensor
) -> torch.Tensor:
    """Compensate rows with ``S0_i = 0`` with the pooled mean of the other rows instead of 0.

    Such a row never reached the output on the calibration data, so any shift costs nothing to
    first order and docs/method.md's convention leaves it unshifted. A removed neuron then still moves
    the row's pre-activation by ``-w_ij a_j``, which can wake a dead ReLU unit on new data; shifting
    by ``w_ij`` times the input's pooled mean ``sum_i S0_i mu_ij / sum_i S0_i`` avoids that (exactly for
    a constant input) at no first-order cost.
    """
    silent = s0 <= 0
    total = s0.sum()
    if not bool(silent.any()) or total <= 0:
        return bias_delta
    pooled = (s0.unsqueeze(1) * mean).sum(dim=0) / total
    return torch.where(silent.unsqueeze(1), weight * pooled.unsqueeze(0), bias_delta)


def neuron_scores(
    model: nn.Module,
    pairs: Sequence[NeuronPair],
    method: str,
    statistics: Mapping[str, LayerStatistics] | None = None,
) -> dict[str, NeuronScore]:
    """Score every hidden neuron of every pair; keys are consumer names.

    ``statistics`` are the consumers' :class:`~ecp_fast.pruning.calibration.LayerStatistics` (required for
    ``ecp``, ``local`` and ``obd``; for ``local`` they must come from ``c = 1``). Scores are computed
    in float64 from the consumer's effective weight (pruning masks applied).
    """
    method = _canonical_method(method)
    modules = dict(model.named_modules())
    result: dict[str, NeuronScore] = {}
    for pair in pairs:
        consumer = modules[pair.consumer]
        weight = weight_2d(consumer).to(torch.float64)
        bias_delta: torch.Tensor | None = None
        if method in NEEDS_STATISTICS:
            stats = None if statistics is None else statistics.get(pair.consumer)
            if stats is None:
                raise ValueError(
                    f"method {method!r} needs calibration statistics of consumer layer {pair.consumer!r}; "
                    "calibrate a Pruner whose layers include it"
                )
            s0, mean, m2 = stats.moments
            if tuple(mean.shape) != tuple(weight.shape):
                raise ValueError(
                    f"the statistics of layer {pair.consumer!r} have shape {tuple(mean.shape)} but its weight is "
                    f"{tuple(weight.shape)}; recalibrate after changing the model"
                )
            s0, mean, m2 = s0.to(torch.float64), mean.to(torch.float64), m2.to(torch.float64)
            if method == "obd":
                score = (weight.square() * (m2 + s0.unsqueeze(1) * mean.square())).sum(dim=0)
            else:
                importance, bias_delta = finalize(s0, mean, m2, weight)
                score = importance.sum(dim=0)
                bias_delta = _fill_silent_rows(bias_delta, s0, mean, weight)
        else:
            score = weight.norm(dim=0)
            if method == "norm_io":
                producer = modules[pair.producer]
                rows = weight_2d(producer).to(torch.float64)
                if producer.bias is not None:
                    rows = torch.cat([rows, producer.bias.detach().to(torch.float64).unsqueeze(1)], dim=1)
                score = score * rows.norm(dim=1)
        if not torch.isfinite(score).all():
            raise ValueError(f"method {method!r} gave non-finite neuron scores for consumer {pair.consumer!r}")
        result[pair.consumer] = NeuronScore(pair, score, bias_delta)
    return result


# ---- selection -----------------------------------------------------------------------------------


def _check_ratio(ratio: float) -> float:
    # numbers.Real: Python and NumPy numbers alike (np.float32 is no float subclass); bool is not a ratio
    if isinstance(ratio, (bool, np.bool_)) or not isinstance(ratio, numbers.Real):
        raise TypeError(f"argument 'ratio' must be a float in [0, 1), got {type(ratio).__name__}")
    if not 0.0 <= float(ratio) < 1.0:
        raise ValueError(f"argument 'ratio' (fraction of hidden neurons to remove) must be in [0, 1), got {ratio}")
    return float(ratio)


def select_neurons(
    scores: Mapping[str, NeuronScore], ratio: float, scope: str = "global", normalize: str = "none", min_keep: int = 1
) -> dict[str, torch.Tensor]:
    """Bool keep-masks ``(H,)`` per consumer that remove ``ratio`` of the hidden neurons.

    ``scope="layer"`` removes ``round(ratio * H)`` from every hidden layer; ``"global"`` ranks all
    neurons together and removes ``round(ratio * sum H)``, after dividing each layer's scores by
    their mean when ``normalize="mean"``. Every layer keeps at least ``min_keep`` neurons; ties go
    to the lower index.
    """
    ratio = _check_ratio(ratio)
    if scope not in SELECTION_SCOPES:
        raise ValueError(f"argument 'scope' must be one of {SELECTION_SCOPES}, got {scope!r}")
    if normalize not in ("none", "mean"):
        raise ValueError(f"argument 'normalize' must be 'none' or 'mean' here, got {normalize!r}")
    if isinstance(min_keep, bool) or not isinstance(min_keep, int) or min_keep < 1:
        raise ValueError(f"argument 'min_keep' must be a positive integer, got {min_keep!r}")
    keep: dict[str, torch.Tensor] = {}
    ranks: dict[str, torch.Tensor] = {}
    values: dict[str, torch.Tensor] = {}
    for name, entry in scores.items():
        value = entry.score.to(torch.float64)
        if normalize == "mean":
            mean = value.mean()
            value = value / mean if mean > 0 else value
        values[name] = value
        order = torch.argsort(value, stable=True)
        rank = torch.empty_like(order)
        rank[order] = torch.arange(order.numel(), device=order.device)
        ranks[name] = rank
    if scope == "layer":
        for name, rank in ranks.items():
            hidden = rank.numel()
            count = min(round(ratio * hidden), max(hidden - min_keep, 0))
            keep[name] = rank >= count
        return keep
    names = list(scores)
    total = sum(ranks[name].numel() for name in names)
    flat_values = torch.cat([values[name].cpu() for name in names])
    allowed = torch.cat([(ranks[name] < ranks[name].numel() - min_keep).cpu() for name in names])
    count = min(round(ratio * total), int(allowed.sum()))
    ranked = torch.where(allowed, flat_values, torch.inf)
    order = torch.argsort(ranked, stable=True)
    flat_keep = torch.ones(total, dtype=torch.bool)
    flat_keep[order[:count]] = False
    for name, part in zip(names, flat_keep.split([ranks[name].numel() for name in names]), strict=True):
        keep[name] = part.to(ranks[name].device)
    return keep


# ---- the plan ------------------------------------------------------------------------------------


@dataclass
class NeuronPlan:
    """Everything a neuron removal needs, computed without touching the model.

    ``keep[consumer]`` is the bool keep-mask ``(H,)`` of the pair's hidden units and
    ``bias_shift[consumer]`` (``(out_consumer,)``, float64) the compensation added to the consumer's
    bias, or None for uncompensated methods.
    """

    pairs: list[NeuronPair]
    keep: dict[str, torch.Tensor]
    bias_shift: dict[str, torch.Tensor | None]
    method: str
    scope: str
    ratio: float
    scores: dict[str, NeuronScore] = field(default_factory=dict)

    @property
    def removed(self) -> dict[str, list[int]]:
        """Indices of the removed hidden units per consumer."""
        return {name: torch.nonzero(~mask).flatten().tolist() for name, mask in self.keep.items()}


def plan_neurons(
    model: nn.Module,
    ratio: float,
    method: str = "ecp",
    scope: str = "global",
    pairs: Sequence[NeuronPair | Sequence[Any]] | None = None,
    statistics: Mapping[str, LayerStatistics] | None = None,
    *,
    normalize: str = "auto",
    min_keep: int = 1,
    compensate: bool | None = None,
    sensitivity: str = "output",
) -> NeuronPlan:
    """Score, select and compute the compensation; the model is only read.

    ``normalize="auto"`` compares raw scores across layers for ``ecp`` and ``obd`` with the
    ``output`` or ``loss`` sensitivity (they are errors of the same network output, a common unit) and
    divides each layer's scores by their mean otherwise (``local``, ``norm``, ``norm_io``: each layer
    has its own units). ``compensate`` overrides the method's default (True for ``ecp`` and
    ``local``); compensation needs statistics. ``sensitivity`` names how ``statistics`` were gathered.
    """
    method = _canonical_method(method)
    ratio = _check_ratio(ratio)
    if scope not in SELECTION_SCOPES:
        raise ValueError(f"argument 'scope' must be one of {SELECTION_SCOPES}, got {scope!r}")
    if normalize not in NORMALIZATIONS:
        raise ValueError(f"argument 'normalize' must be one of {NORMALIZATIONS}, got {normalize!r}")
    resolved = resolve_pairs(model, pairs)
    if compensate is None:
        compensate = method in COMPENSATING
    if normalize == "auto":
        same_unit = method in ("ecp", "obd") and sensitivity in ("output", "loss")
        normalize = "none" if same_unit else "mean"
    scores = neuron_scores(model, resolved, method, statistics)
    if compensate and method not in COMPENSATING:
        # The uncompensated score with the compensation of ECP's statistics (mean shift) added on top.
        compensation = neuron_scores(model, resolved, "ecp", statistics)
        for name, entry in scores.items():
            entry.bias_delta = compensation[name].bias_delta
    keep = select_neurons(scores, ratio, scope, normalize, min_keep)
    bias_shift: dict[str, torch.Tensor | None] = {}
    for name, entry in scores.items():
        if not compensate or entry.bias_delta is None:
            bias_shift[name] = None
            continue
        bias_shift[name] = entry.bias_delta[:, ~keep[name]].sum(dim=1)
    return NeuronPlan(resolved, keep, bias_shift, method, scope, ratio, scores)


# ---- surgery -------------------------------------------------------------------------------------


def _parent_and_attribute(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    parent_name, _, attribute = name.rpartition(".")
    return (model.get_submodule(parent_name) if parent_name else model), attribute


def _parameter_like(value: torch.Tensor, like: torch.Tensor) -> nn.Parameter:
    """A parameter holding ``value`` with the ``requires_grad`` of ``like`` (the parameter, never a detached copy)."""
    return nn.Parameter(value.detach().clone().contiguous(), requires_grad=like.requires_grad)


def _select(tensor: torch.Tensor, transposed: bool, rows: torch.Tensor, columns: torch.Tensor) -> torch.Tensor:
    """The kept ``rows`` (outputs) and ``columns`` (inputs) of a weight-shaped tensor, in its stored layout."""
    matrix = tensor.t() if transposed else tensor
    kept = matrix.index_select(0, rows).index_select(1, columns)
    return (kept.t() if transposed else kept).contiguous()


def _empty_dense(module: nn.Module, shape: tuple[int, int], bias: bool, like: torch.Tensor) -> nn.Module:
    """An uninitialised ``nn.Linear`` of ``shape`` ``(out, in)``, or a module of ``module``'s Conv1D class."""
    if not is_transposed_linear(module):
        return nn.Linear(shape[1], shape[0], bias=bias, device=like.device, dtype=like.dtype)
    # On the meta device: no random initialisation of weights that are replaced at once.
    with torch.device("meta"):
        try:
            new = type(module)(shape[0], shape[1])  # Conv1D(nf=out, nx=in)
        except TypeError as error:
            raise TypeError(
                f"cannot build a smaller {type(module).__name__} as {type(module).__name__}(nf, nx): {error}"
            ) from error
    if not bias:
        new.register_parameter("bias", None)
    return new


def _build_linear(
    module: nn.Module, rows: torch.Tensor | None, columns: torch.Tensor | None, bias_shift: torch.Tensor | None
) -> nn.Module:
    """A new Linear (or Conv1D) with the kept ``rows`` (outputs) and ``columns`` (inputs) and the shifted bias.

    Every new parameter takes the ``requires_grad`` of the one it replaces (a new bias: the weight's).
    """
    stored = weight_parameter(module)
    weight, transposed = stored.detach(), is_transposed_linear(module)
    out_features, in_features = _dense_shape(module)
    mask = existing_mask(module)
    old_bias: torch.Tensor | None = getattr(module, "bias", None)
    bias = None if old_bias is None else old_bias.detach()
    if bias_shift is not None:
        base = bias if bias is not None else weight.new_zeros(out_features)
        bias = (base.to(torch.float64) + bias_shift.to(device=base.device)).to(weight.dtype)
    row_index = torch.arange(out_features, device=weight.device) if rows is None else rows.to(weight.device)
    column_index = torch.arange(in_features, device=weight.device) if columns is None else columns.to(weight.device)
    new_weight = _select(weight, transposed, row_index, column_index)
    new = _empty_dense(module, (row_index.numel(), column_index.numel()), bias is not None, weight)
    new.weight = _parameter_like(new_weight, stored)
    if bias is not None:
        new.bias = _parameter_like(bias.index_select(0, row_index), stored if old_bias is None else old_bias)
    if any(tensor.is_meta for tensor in itertools.chain(new.parameters(), new.buffers())):
        raise TypeError(f"cannot shrink a {type(module).__name__}: it holds tensors besides weight and bias")
    new.train(module.training)
    if mask is not None:
        torch_prune.custom_from_mask(new, "weight", _select(mask, transposed, row_index, column_index))
    if module._forward_hooks or module._backward_hooks or (module._forward_pre_hooks and mask is None):
        logger.warning("layer hooks of a replaced Linear are not carried over to its smaller copy")
    return new


def _build_per_feature(module: nn.Module, index: torch.Tensor) -> nn.Module:
    """A copy of a BatchNorm1d / LayerNorm / PReLU keeping the features ``index``."""
    new = copy_model(module)
    count = int(index.numel())
    with torch.no_grad():
        for attribute in ("weight", "bias"):
            parameter = getattr(module, attribute, None)
            if isinstance(parameter, nn.Parameter) and parameter.dim() == 1 and parameter.numel() > 1:
                setattr(
                    new, attribute, _parameter_like(parameter.index_select(0, index.to(parameter.device)), parameter)
                )
        if isinstance(new, nn.BatchNorm1d):  # new is a copy of module: the same class
            new.num_features = count
            for buffer in ("running_mean", "running_var"):
                value = getattr(module, buffer)
                if value is not None:
                    setattr(new, buffer, value.index_select(0, index.to(value.device)).clone())
        elif isinstance(new, nn.LayerNorm):
            new.normalized_shape = (count,)
        elif isinstance(new, nn.PReLU) and new.num_parameters > 1:
            new.num_parameters = count
    return new


def build_replacements(model: nn.Module, plan: NeuronPlan) -> dict[str, nn.Module]:
    """The smaller modules of ``plan`` by qualified name; the model is only read."""
    _check_plan(model, plan)
    modules = dict(model.named_modules())
    rows: dict[str, torch.Tensor] = {}
    columns: dict[str, torch.Tensor] = {}
    shifts: dict[str, torch.Tensor] = {}
    replacements: dict[str, nn.Module] = {}
    for pair in plan.pairs:
        keep = plan.keep[pair.consumer]
        index = torch.nonzero(keep).flatten()
        shift = plan.bias_shift.get(pair.consumer)
        if bool(keep.all()):
            continue  # nothing removed, and the compensation of nothing is zero
        rows[pair.producer] = index
        columns[pair.consumer] = index
        for norm in pair.norms:
            replacements[norm] = _build_per_feature(modules[norm], index)
        if shift is not None:
            shifts[pair.consumer] = shift
    for name in dict.fromkeys([*rows, *columns, *shifts]):
        module = modules[name]
        replacements[name] = _build_linear(module, rows.get(name), columns.get(name), shifts.get(name))
    return replacements


def _swap(model: nn.Module, replacements: Mapping[str, nn.Module]) -> None:
    """Install the replacements; on any failure (KeyboardInterrupt too) every original module is back."""
    with model_transaction(model, values=False):
        for name, module in replacements.items():
            parent, attribute = _parent_and_attribute(model, name)
            setattr(parent, attribute, module)


def shrink_model(model: nn.Module, plan: NeuronPlan) -> None:
    """Replace the planned layers of ``model`` (in place) by smaller plain ``torch.nn`` modules.

    Every new module is built before the first is installed; the model is unchanged on failure.
    """
    _swap(model, build_replacements(model, plan))


def _check_plan(model: nn.Module, plan: NeuronPlan) -> None:
    """Raise ``ValueError`` unless every pair of ``plan`` exists in ``model`` with the planned sizes."""
    if not isinstance(plan, NeuronPlan):
        raise TypeError(f"argument 'plan' must be a NeuronPlan, got {type(plan).__name__}")
    modules = dict(model.named_modules())
    for pair in plan.pairs:
        producer, consumer = modules.get(pair.producer), modules.get(pair.consumer)
        keep = plan.keep.get(pair.consumer)
        if producer is None or consumer is None or not _is_dense(producer) or not _is_dense(consumer) or keep is None:
            raise ValueError(
                f"argument 'plan': pair ({pair.producer!r}, {pair.consumer!r}) is not a pair of Linear layers of "
                "this model with a keep-mask; plan and model disagree"
            )
        (outputs, inputs), hidden = _dense_shape(consumer), _dense_shape(producer)[0]
        if keep.numel() != inputs or hidden != inputs:
            raise ValueError(
                f"argument 'plan': the plan for ({pair.producer!r}, {pair.consumer!r}) has {keep.numel()} hidden "
                f"units, the model {inputs}; plan and model disagree"
            )
        shift = plan.bias_shift.get(pair.consumer)
        if shift is not None and tuple(shift.shape) != (outputs,):
            raise ValueError(
                f"argument 'plan': the bias shift of {pair.consumer!r} must have shape ({outputs},), "
                f"got {tuple(shift.shape)}"
            )


def mask_neurons(model: nn.Module, plan: NeuronPlan) -> None:
    """Apply ``plan`` without shrinking: zero the consumers' removed columns and shift their biases.

    The result computes the same function as :func:`shrink_model`'s (exactly, for every pair
    without a LayerNorm, which normalises over all features); useful as a reference and for
    inspecting the compensation at full size. The plan is checked first; the model is unchanged
    on failure.
    """
    _check_plan(model, plan)
    modules = dict(model.named_modules())
    with model_transaction(model), torch.no_grad():
        for pair in plan.pairs:
            consumer = modules[pair.consumer]
            weight = weight_parameter(consumer)
            removed = ~plan.keep[pair.consumer].to(weight.device)
            # the (out, in) view that writes through (a transpose for Conv1D, which stores (in, out))
            matrix = LayerSpec(pair.consumer, consumer, layer_kind(consumer) or "linear").weight_view()
            matrix[:, removed] = 0
            shift = plan.bias_shift.get(pair.consumer)
            if shift is not None:
                if consumer.bias is None:
                    zeros = torch.zeros(matrix.shape[0], dtype=weight.dtype, device=weight.device)
                    consumer.bias = nn.Parameter(zeros, requires_grad=weight.requires_grad)
                consumer.bias.copy_((consumer.bias.to(torch.float64) + shift.to(weight.device)).to(weight.dtype))


# ---- report --------------------------------------------------------------------------------------


def count_parameters(model: nn.Module) -> int:
    """Number of parameter entries of the model (``weight_orig`` counted once for masked layers)."""
    return sum(parameter.numel() for parameter in model.parameters())


def linear_flops(model: nn.Module) -> int:
    """FLOPs of all ``nn.Linear`` and ``Conv1D`` layers for one input row (a sample, a token): ``2 * in * out`` each.

    A multiply-add counts as two FLOPs; bias additions, activations and norms are not counted.
    """
    return sum(2 * math.prod(_dense_shape(m)) for m in model.modules() if _is_dense(m))


@dataclass
class PairReport:
    """One hidden layer after neuron removal; ``bias_change_l1`` is ``sum |db|`` over the consumer bias
    entries the returned model keeps (rows a later pair removes are not counted)."""

    producer: str
    consumer: str
    hidden_before: int
    hidden_after: int
    bias_change_l1: float

    @property
    def removed_fraction(self) -> float:
        """Fraction of the hidden units removed."""
        return 1.0 - self.hidden_after / self.hidden_before if self.hidden_before else 0.0


@dataclass
class StructuredReport:
    """What :func:`prune_neurons` did; ``str(report)`` is a table. ``model`` is the pruned model."""

    method: str
    scope: str
    ratio: float
    compensated: bool
    pairs: list[PairReport]
    parameters_before: int
    parameters_after: int
    flops_before: int
    flops_after: int
    model: nn.Module
    plan: NeuronPlan

    @property
    def hidden_before(self) -> int:
        """Hidden units before, over all pairs."""
        return sum(pair.hidden_before for pair in self.pairs)

    @property
    def hidden_after(self) -> int:
        """Hidden units after, over all pairs."""
        return sum(pair.hidden_after for pair in self.pairs)

    @property
    def removed_fraction(self) -> float:
        """Fraction of the hidden units actually removed (``ratio`` is what was asked for)."""
        return 1.0 - self.hidden_after / self.hidden_before if self.hidden_before else 0.0

    @property
    def parameter_ratio(self) -> float:
        """Parameters after / before."""
        return self.parameters_after / self.parameters_before if self.parameters_before else 1.0

    @property
    def flops_ratio(self) -> float:
        """Linear FLOPs per sample after / before."""
        return self.flops_after / self.flops_before if self.flops_before else 1.0

    def to_rows(self) -> list[dict[str, Any]]:
        """One dict per hidden layer, for CSV or logging."""
        return [
            {
                "producer": pair.producer,
                "consumer": pair.consumer,
                "hidden_before": pair.hidden_before,
                "hidden_after": pair.hidden_after,
                "bias_change_l1": pair.bias_change_l1,
            }
            for pair in self.pairs
        ]

    def __str__(self) -> str:
        lines = [
            f"method={self.method} scope={self.scope} ratio={self.ratio:.4g} compensated={self.compensated} "
            f"hidden {self.hidden_before} -> {self.hidden_after}",
            f"parameters {self.parameters_before} -> {self.parameters_after} ({self.parameter_ratio:.3f}x), "
            f"Linear FLOPs/sample {self.flops_before} -> {self.flops_after} ({self.flops_ratio:.3f}x)",
        ]
        width = max([len("producer -> consumer")] + [len(f"{p.producer} -> {p.consumer}") for p in self.pairs])
        lines.append(f"{'producer -> consumer':<{width}}  {'before':>7}  {'after':>7}  {'removed':>7}  {'sum|db|':>10}")
        for pair in self.pairs:
            label = f"{pair.producer} -> {pair.consumer}"
            lines.append(
                f"{label:<{width}}  {pair.hidden_before:>7}  {pair.hidden_after:>7}  "
                f"{pair.removed_fraction:>7.3f}  {pair.bias_change_l1:>10.4g}"
            )
        return "\n".join(lines)


# ---- the entry point -----------------------------------------------------------------------------


def _check_options(
    scope: str, sensitivity: str, normalize: str, min_keep: int, compensate: bool | None, inplace: bool, batches: Any
) -> None:
    """Raise for a bad option of :func:`prune_neurons` before anything is calibrated or changed."""
    if scope not in SELECTION_SCOPES:
        raise ValueError(f"argument 'scope' must be one of {SELECTION_SCOPES}, got {scope!r}")
    if sensitivity not in SENSITIVITIES:
        raise ValueError(f"argument 'sensitivity' must be one of {SENSITIVITIES}, got {sensitivity!r}")
    if normalize not in NORMALIZATIONS:
        raise ValueError(f"argument 'normalize' must be one of {NORMALIZATIONS}, got {normalize!r}")
    if isinstance(min_keep, bool) or not isinstance(min_keep, int) or min_keep < 1:
        raise ValueError(f"argument 'min_keep' must be a positive integer, got {min_keep!r}")
    if compensate is not None and not isinstance(compensate, bool):
        raise TypeError(f"argument 'compensate' must be True, False or None, got {compensate!r}")
    if not isinstance(inplace, bool):
        raise TypeError(f"argument 'inplace' must be a bool, got {inplace!r}")
    if batches is None:
        return
    if isinstance(batches, torch.Tensor):
        raise TypeError(
            "argument 'batches' must be an iterable of batches (a list of tensors or of (inputs, targets)), got a "
            "single Tensor (iterating it would treat every row as a batch); pass [tensor]"
        )
    if isinstance(batches, (str, bytes)) or not hasattr(batches, "__iter__"):
        raise TypeError(f"argument 'batches' must be an iterable of batches or None, got {type(batches).__name__}")


def _statistics_for(
    pruner: Pruner | None, model: nn.Module, method: str, consumers: list[str], options: _NeuronOptions
) -> tuple[Mapping[str, LayerStatistics] | None, str]:
    """The consumers' statistics (calibrating when needed) and the sensitivity they come from."""
    batches, sensitivity = options.batches, options.sensitivity
    if not options.wants_statistics(method):
        return None, sensitivity
    if pruner is not None:
        if method == "local" and pruner.sensitivity != "local":
            # Pruner keeps the batches it was calibrated on; reuse them for the c = 1 moments.
            source = batches if batches is not None else getattr(pruner, "_batches", None)
            if source is not None and batches is None and iter(source) is source:
                source = None  # a one-shot iterator, already consumed
            return _local_statistics(model, consumers, source), "local"
        if not pruner.statistics:
            raise RuntimeError(f"method {method!r} needs statistics: call Pruner.calibrate(batches) first")
        return pruner.statistics, pruner.sensitivity
    if method == "local" or sensitivity == "local":
        return _local_statistics(model, consumers, batches), "local"
    if batches is None:
        raise ValueError(f"method {method!r} on a bare model needs calibration batches: pass batches=...")
    calibrating = Pruner(model, sensitivity=sensitivity, layers=consumers, progress=False)
    calibrating.calibrate(batches, loss_fn=options.loss_fn)
    return calibrating.statistics, sensitivity


def _dead_units(model: nn.Module, pairs: Sequence[NeuronPair]) -> tuple[int, int]:
    """Hidden units whose consumer column is already all zero (masked or zeroed), and all hidden units."""
    modules = dict(model.named_modules())
    dead = total = 0
    for pair in pairs:
        weight = weight_2d(modules[pair.consumer])
        dead += int((weight == 0).all(dim=0).sum())
        total += weight.shape[1]
    return dead, total


def _warn_about_sparsity(model: nn.Module, pairs: Sequence[NeuronPair], ratio: float) -> None:
    """Warn when the model already has more dead hidden units than ``ratio`` asks to remove."""
    dead, total = _dead_units(model, pairs)
    if total and ratio > 0 and dead / total > ratio:
        warnings.warn(
            f"prune_neurons: argument 'ratio' ({ratio:.4g}) is below the fraction of hidden units the model has "
            f"already switched off ({dead} of {total} consumer columns are all zero, {dead / total:.4g}); ratio "
            "counts the units this call removes, so the result keeps some of the dead units",
            UserWarning,
            stacklevel=3,
        )


def _build_report(
    target: nn.Module, plan: NeuronPlan, hidden_before: Mapping[str, int], counts: tuple[int, int]
) -> StructuredReport:
    """The :class:`StructuredReport` of a finished removal (``counts``: parameters and FLOPs before)."""
    # A consumer that is also the producer of a later pair loses the rows that pair removes: the
    # report counts the shift of the rows the returned model keeps.
    kept_rows = {pair.producer: plan.keep[pair.consumer] for pair in plan.pairs}
    pair_reports = []
    for pair in plan.pairs:
        shift = plan.bias_shift[pair.consumer]
        if shift is not None and pair.consumer in kept_rows:
            shift = shift[kept_rows[pair.consumer].to(shift.device)]
        pair_reports.append(
            PairReport(
                producer=pair.producer,
                consumer=pair.consumer,
                hidden_before=hidden_before[pair.consumer],
                hidden_after=int(plan.keep[pair.consumer].sum()),
                bias_change_l1=0.0 if shift is None else float(shift.abs().sum()),
            )
        )
    return StructuredReport(
        method=plan.method,
        scope=plan.scope,
        ratio=plan.ratio,
        compensated=any(shift is not None for shift in plan.bias_shift.values()),
        pairs=pair_reports,
        parameters_before=counts[0],
        parameters_after=count_parameters(target),
        flops_before=counts[1],
        flops_after=linear_flops(target),
        model=target,
        plan=plan,
    )


def _warn_if_short(report: StructuredReport, min_keep: int) -> None:
    """Warn when ``min_keep`` kept the removal below the requested ratio (never report it silently)."""
    requested = report.ratio * report.hidden_before
    removed = report.hidden_before - report.hidden_after
    if report.scope == "layer":
        requested = sum(round(report.ratio * pair.hidden_before) for pair in report.pairs)
    if removed < round(requested):
        warnings.warn(
            f"prune_neurons: removed {removed} of {report.hidden_before} hidden units "
            f"({report.removed_fraction:.4g}), fewer than ratio={report.ratio:.4g} asks ({round(requested)}), "
            f"because every layer keeps at least min_keep={min_keep} units",
            UserWarning,
            stacklevel=3,
        )


def _restore_pruner(pruner: Pruner, layers: Any, calibration: Any) -> None:
    pruner.layers = layers
    pruner.calibration = calibration


@dataclass(frozen=True)
class _NeuronOptions:
    """The options of :func:`prune_neurons`, checked when built."""

    scope: str
    batches: Iterable[Any] | None
    sensitivity: str
    normalize: str
    min_keep: int
    compensate: bool | None
    inplace: bool
    loss_fn: LossFn | None = None

    def __post_init__(self) -> None:
        _check_options(
            self.scope, self.sensitivity, self.normalize, self.min_keep, self.compensate, self.inplace, self.batches
        )
        if self.loss_fn is not None and not callable(self.loss_fn):
            raise TypeError(
                f"argument 'loss_fn' must be a callable loss_fn(outputs, targets) or None, got {self.loss_fn!r}"
            )

    def wants_statistics(self, method: str) -> bool:
        """Whether ``method`` with these options reads calibration statistics."""
        return method in NEEDS_STATISTICS or bool(self.compensate)

    def check_loss_fn(self, pruner: Pruner | None, method: str) -> None:
        """``loss_fn`` is what a bare model's ``sensitivity="loss"`` calibration needs, and only that."""
        if pruner is not None and self.loss_fn is not None:
            raise ValueError(
                "argument 'loss_fn' calibrates a bare model; a Pruner brings its own statistics: expected "
                "loss_fn=None with a Pruner (pass loss_fn to pruner.calibrate), got a loss_fn"
            )
        calibrates_loss = self.sensitivity == "loss" and method != "local" and self.wants_statistics(method)
        if pruner is None and calibrates_loss and self.loss_fn is None:
            raise ValueError(
                f"argument 'loss_fn': sensitivity='loss' calibrates {method!r} on per-sample loss gradients and "
                "needs loss_fn(outputs, targets) with (inputs, targets) batches, got loss_fn=None"
            )


def _pruner_and_model(pruner_or_model: Pruner | nn.Module) -> tuple[Pruner | None, nn.Module]:
    pruner = pruner_or_model if isinstance(pruner_or_model, Pruner) else None
    model = pruner.model if pruner is not None else pruner_or_model
    if not isinstance(model, nn.Module):
        raise TypeError(f"argument 'pruner_or_model' must be a Pruner or an nn.Module, got {type(model).__name__}")
    return pruner, model


def _remove_neurons(
    pruner: Pruner | None,
    model: nn.Module,
    ratio: float,
    method: str,
    resolved: list[NeuronPair],
    options: _NeuronOptions,
) -> StructuredReport:
    """The body of :func:`prune_neurons` with validated arguments, in a transaction that restores model and pruner."""
    with model_transaction(model) as transaction:
        if pruner is not None:
            transaction.on_rollback(partial(_restore_pruner, pruner, pruner.layers, pruner.calibration))
        scope, inplace = options.scope, options.inplace
        consumers = [pair.consumer for pair in resolved]
        statistics, used_sensitivity = _statistics_for(pruner, model, method, consumers, options)
        plan = plan_neurons(
            model,
            ratio,
            method,
            scope,
            resolved,
            statistics,
            normalize=options.normalize,
            min_keep=options.min_keep,
            compensate=options.compensate,
            sensitivity=used_sensitivity,
        )
        counts = (count_parameters(model), linear_flops(model))
        modules = dict(model.named_modules())
        hidden_before = {pair.consumer: _dense_shape(modules[pair.producer])[0] for pair in resolved}
        target = model if inplace else copy_model(model)
        shrink_model(target, plan)
        _check_still_runs(target, _check_batches(pruner, options), resolved)
        if inplace and pruner is not None:
            pruner.layers = resolve_layers(model, list(pruner.layers))
            pruner.calibration = None
            logger.info("pruner layers re-resolved to the smaller modules; recalibrate before scoring again")
        report = _build_report(target, plan, hidden_before, counts)
        logger.info(
            "removed %d of %d hidden neurons (%s, %s): parameters %.3fx, Linear FLOPs %.3fx",
            report.hidden_before - report.hidden_after,
            report.hidden_before,
            method,
            scope,
            report.parameter_ratio,
            report.flops_ratio,
        )
        return report


def _check_batches(pruner: Pruner | None, options: _NeuronOptions) -> Iterable[Any] | None:
    """Re-iterable batches to try the smaller model on (the caller's, else the pruner's), or None."""
    batches = options.batches if options.batches is not None else getattr(pruner, "_batches", None)
    return None if batches is None or iter(batches) is batches else batches


def _check_still_runs(model: nn.Module, batches: Iterable[Any] | None, pairs: Sequence[NeuronPair]) -> None:
    """Run one calibration batch through the smaller model (eval mode, no gradients): hidden units that
    feed more than their consumer (a residual connection, a second branch) leave shapes that no longer
    fit, found here, where the transaction restores the model, rather than at the caller's next call.
    Without re-iterable batches nothing is tried."""
    first = None if batches is None else next(iter(batches), None)
    if first is None:
        return
    inputs = to_device(split_batch(first)[0], module_device(model))
    try:
        with torch.no_grad(), eval_mode(model):
            call_model(model, inputs)
    except RuntimeError as error:
        names = ", ".join(f"({pair.producer!r}, {pair.consumer!r})" for pair in pairs)
        raise ValueError(
            f"argument 'pairs': after removing hidden units of {names} the model no longer runs on a calibration "
            f"batch ({type(error).__name__}: {str(error).splitlines()[0]}); where that is a shape mismatch, a "
            "residual connection or second branch reads the pair's hidden units besides its consumer: pass "
            "pairs= without that pair. The model is as it was."
        ) from error


@renamed_keyword("criterion", "sensitivity")
def prune_neurons(
    pruner_or_model: Pruner | nn.Module,
    ratio: float,
    method: str = "ecp",
    scope: str = "global",
    pairs: Sequence[NeuronPair | Sequence[Any]] | None = None,
    *,
    batches: Iterable[Any] | None = None,
    sensitivity: str = "output",
    normalize: str = "auto",
    min_keep: int = 1,
    compensate: bool | None = None,
    inplace: bool = True,
    loss_fn: LossFn | None = None,
) -> StructuredReport:
    """Remove ``ratio`` of the hidden neurons with compensation and shrink the Linear layers.

    Args:
        pruner_or_model: a calibrated :class:`~ecp_fast.pruning.pruner.Pruner` (its statistics are used;
            its layers must include every consumer) or a model (then ``batches`` are calibrated
            with ``sensitivity`` when the method needs statistics).
        ratio: fraction of the hidden units to remove, in ``[0, 1)``.
        method: ``"ecp"``, ``"local"``, ``"obd"``, ``"norm"`` (alias ``"magnitude"``) or ``"norm_io"``.
        scope: ``"global"`` (one ranking over all hidden layers) or ``"layer"`` (``ratio`` of every one).
        pairs: ``(producer, consumer)`` or ``(producer, consumer, norms)`` names (Linear or GPT-2's
            ``Conv1D``; norms they certainly feed are added, see :func:`resolve_pairs`); None detects
            them (:func:`find_neuron_pairs`). Gated MLPs and layers used twice or with tied weights are
            refused, detected or named.
        batches: calibration data for a bare model, or for ``"local"`` with a pruner calibrated
            with another sensitivity (default: the batches that pruner was calibrated on).
        sensitivity: how a bare model is calibrated (``"output"``, ``"loss"``, ``"local"``).
        loss_fn: ``loss_fn(outputs, targets)`` of a bare model's ``"loss"`` sensitivity (not with a pruner).
        normalize: cross-layer comparison in the global scope: ``"auto"``, ``"none"``, ``"mean"``
            (see :func:`plan_neurons`).
        min_keep: hidden units every layer keeps.
        compensate: override the method's default bias compensation.
        inplace: replace the modules of the given model (the model object stays the same); else
            shrink a deep copy and leave the input untouched.

    Returns:
        A :class:`StructuredReport`; ``report.model`` is the smaller model. When ``inplace`` and a
        pruner was given, its layers are re-resolved to the new modules and its calibration is
        cleared (the statistics describe the old shapes).

    Raises:
        ValueError / TypeError: bad ratio, method, scope, pairs (a gated MLP, a shared layer) or options,
        missing statistics, before anything is calibrated or changed; a smaller model that fails on a
        re-iterable calibration batch (a residual reads the units). Any later failure (KeyboardInterrupt
        too) restores model and pruner exactly. A UserWarning says when the model already has more
        all-zero hidden units than ``ratio``, or when ``min_keep`` keeps the removal below it.
    """
    method, ratio = _canonical_method(method), _check_ratio(ratio)
    options = _NeuronOptions(scope, batches, sensitivity, normalize, min_keep, compensate, inplace, loss_fn)
    pruner, model = _pruner_and_model(pruner_or_model)
    options.check_loss_fn(pruner, method)
    resolved = resolve_pairs(model, pairs)
    _warn_about_sparsity(model, resolved, ratio)
    report = _remove_neurons(pruner, model, ratio, method, resolved, options)
    _warn_if_short(report, min_keep)
    return report


def _prune_pruner_layers(pruner: Pruner, ratio: float, *, method: str, scope: str) -> StructuredReport:
    """``Pruner.prune(scope="neuron")``: :func:`prune_neurons` on the detected pairs whose producer (the
    layer whose outputs go) is one of the pruner's layers, so that its ``layers=`` and ``exclude=`` hold."""
    _canonical_method(method)  # the argument errors of prune_neurons, before the pairs are detected
    _check_ratio(ratio)
    pairs = resolve_pairs(pruner.model, None, producers=list(pruner.layers))
    return prune_neurons(pruner, ratio, method, scope, pairs)


register_neuron_pruning(_prune_pruner_layers)
