"""Calibration: stream per-layer statistics through forward hooks and backward hooks.

For every scored layer and every calibration batch, a forward hook sees the layer's input ``a``
and taps its pre-activation ``z``; backward passes then deliver the output gradients
``g = dy/dz`` (exact Jacobian rows, Rademacher probes, per-sample loss gradients, or ``c = 1``,
docs/method.md) to a hook on each ``z``, which reduces them at once: each layer's gradient of one pass is
folded into that layer's sensitivities ``c = sum_p g_p^2`` (``(N, out)``) and freed while the
backward pass moves on to the earlier layers, so no pass ever holds every layer's gradients, and
never ``P`` of them. ``ecp_fast.moments`` then turns ``(a, c)`` into the sensitivity-weighted
moments of the batch. With ``sensitivity="local"`` the moments are computed inside the forward
hook and no graph is built. Batches are merged with :func:`merge_statistics`, so memory does not
grow with the number of samples. The same pass streams what the baselines need: ``sum_s a_j^2``
(wanda) and the summed loss gradient ``dL/dW`` (gradient, taylor).

Batches may be tensors, mappings (called as ``model(**batch)``; an ``attention_mask`` makes padding
tokens count for nothing) or captured block inputs (:mod:`ecp_fast.pruning.batches`).

Everything a distributed job must reduce lives in :class:`LayerStatistics` and is merged by the one
function :func:`merge_statistics` (moments merge exactly, the sums add).

The layer helpers (:class:`LayerSpec`, :func:`resolve_layers`, :func:`weight_parameter`,
:func:`existing_mask`, :func:`weight_2d`) live in :mod:`ecp_fast.pruning.layers` and are
re-exported here.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
from torch import nn
from tqdm.auto import tqdm

from ecp_fast._deprecation import renamed_keyword
from ecp_fast._iterables import known_length
from ecp_fast.ops import moments as fused_moments
from ecp_fast.ops.merge import Moments, merge_moments
from ecp_fast.pruning.batches import (
    BATCHES_HINT,
    batch_error,
    batch_rows,
    call_model,
    count_samples,
    describe,
    eval_mode,
    model_errors,
    model_output,
    module_device,
    passes_through,
    sample_weights,
    slice_rows,
    split_batch,
    to_device,
)
from ecp_fast.pruning.layers import (  # re-exported: pruner, sequential, importance, structured import them from here
    LayerSpec,
    _conv_padding,  # noqa: F401  (kept importable from here)
    existing_mask,
    layer_input,
    resolve_layers,
    weight_2d,
    weight_parameter,
)
from ecp_fast.pruning.layers import unsupported_reason as _unsupported_reason  # noqa: F401

logger = logging.getLogger(__name__)

__all__ = [
    "CalibrationResult",
    "Calibrator",
    "DEFAULT_PROBES",
    "LayerGradients",
    "LayerSpec",
    "LayerStatistics",
    "MAX_EXACT_OUTPUTS",
    "MAX_STORED_SAMPLES",
    "SENSITIVITIES",
    "existing_mask",
    "merge_statistics",
    "resolve_layers",
    "weight_2d",
    "weight_parameter",
]

SENSITIVITIES = ("output", "loss", "local")
#: Up to this many model outputs the exact Jacobian rows are computed; above it, Rademacher probes.
MAX_EXACT_OUTPUTS = 32
#: Probes used when the outputs are too many for exact rows and ``probes`` was not given.
DEFAULT_PROBES = 16
#: The ``nonlinear`` baseline replays the calibration inputs; at most this many are kept for it.
MAX_STORED_SAMPLES = 1024

LossFn = Callable[[torch.Tensor, Any], torch.Tensor]


# ---- statistics ------------------------------------------------------------------------------------


@dataclass
class LayerStatistics:
    """What calibration accumulated for one layer; every field is a sum over samples.

    ``moments`` are the sensitivity-weighted moments ``(s0, mean, m2)`` (docs/method.md);
    ``activation_sq_sum`` ``(in,)`` is ``sum_s a_j^2``; ``loss_grad_sum`` ``(out, in)`` is the
    gradient of the summed per-sample loss (None when no loss was given); ``samples`` counts the rows that
    count (padding tokens excluded).
    """

    moments: Moments
    activation_sq_sum: torch.Tensor
    loss_grad_sum: torch.Tensor | None = None
    samples: int = 0


def merge_statistics(a: LayerStatistics | None, b: LayerStatistics) -> LayerStatistics:
    """Merge the statistics of two disjoint sample sets (batches, or ranks of a distributed job)."""
    for name, part in (("a", a), ("b", b)):
        if not isinstance(part, LayerStatistics) and (name == "b" or part is not None):
            raise TypeError(
                f"merge_statistics: argument {name!r} must be LayerStatistics"
                f"{' or None' if name == 'a' else ''}, got {type(part).__name__}"
            )
    if a is None:
        return b
    if (a.loss_grad_sum is None) != (b.loss_grad_sum is None):
        raise ValueError("merge_statistics: both parts must have loss gradients, or neither")
    loss_grad_sum = None
    if a.loss_grad_sum is not None and b.loss_grad_sum is not None:
        loss_grad_sum = a.loss_grad_sum + b.loss_grad_sum
    return LayerStatistics(
        moments=merge_moments(a.moments, b.moments),
        activation_sq_sum=a.activation_sq_sum + b.activation_sq_sum,
        loss_grad_sum=loss_grad_sum,
        samples=a.samples + b.samples,
    )


@dataclass
class CalibrationResult:
    """Statistics per layer, the samples seen and (for small sets) the inputs kept for replay."""

    statistics: dict[str, LayerStatistics]
    samples: int
    batches: int
    inputs: torch.Tensor | None = None
    inputs_complete: bool = False
    has_loss: bool = False
    extra: dict[str, Any] = field(default_factory=dict)
    #: Per batch, each layer's ``(N,)`` row sensitivities (:meth:`Calibrator.row_sensitivities`), when
    #: :meth:`Calibrator.run` was asked to keep them; None otherwise.
    row_sensitivities: list[dict[str, torch.Tensor]] | None = None


class LayerGradients(NamedTuple):
    """One batch of one layer: inputs ``x`` ``(N, in)``, gradients ``g`` ``(P, N, out)`` or None
    (``c = 1``), per-sample loss gradients ``loss_g`` ``(N, out)`` or None."""

    x: torch.Tensor
    g: torch.Tensor | None
    loss_g: torch.Tensor | None


def _check_statistics(name: str, stats: LayerStatistics) -> None:
    """``ValueError`` when finite inputs and gradients still overflowed a layer's float32 sums.

    Checked once on the merged statistics: a non-finite part makes its merge non-finite too.
    """
    sums = [stats.moments.s0, stats.moments.mean, stats.moments.m2, stats.activation_sq_sum]
    if stats.loss_grad_sum is not None:
        sums.append(stats.loss_grad_sum)
    if not all(_finite(t) for t in sums):
        raise ValueError(
            f"calibration: the statistics of layer {name!r} overflowed to NaN or Inf "
            "(expected finite sums; the activations or gradients are too large)"
        )


def _check_finite(t: torch.Tensor, what: str, expected: str) -> None:
    # A float64 sum is NaN or Inf exactly when an element is (float32 data cannot overflow it), and
    # it reads the tensor once without allocating a mask.
    if not _finite(t):
        raise ValueError(f"{what} contain NaN or Inf (expected finite {expected})")


def _finite(t: torch.Tensor) -> bool:
    """Whether every element of ``t`` is finite; one float64 reduction, no mask allocated."""
    return bool(torch.isfinite(t.sum(dtype=torch.float64)))


# ---- one batch ----------------------------------------------------------------------------------------


class _Rows(NamedTuple):
    """Which of a layer's ``N`` rows count (None: all) and the square roots of their weights (None: all 1)."""

    kept: torch.Tensor | None
    scale: torch.Tensor | None


def _row_selection(weights: torch.Tensor | None, count: int, cache: dict[int, _Rows]) -> _Rows:
    """The rows of a layer's ``(N, in)`` samples that count, from the batch's per-token weights.

    Weights apply to layers whose samples are the batch's tokens (``N`` equals the number of
    weights); a layer that sees other samples (a pooled classifier head) counts every row.
    """
    if weights is None or weights.numel() != count:
        return _Rows(None, None)
    if count not in cache:
        keep = weights != 0
        index = None if bool(keep.all()) else keep.nonzero().squeeze(1)
        kept = weights if index is None else weights.index_select(0, index)
        scale = None if bool((kept == 1).all()) else kept.sqrt()
        cache[count] = _Rows(index, scale)
    return cache[count]


def _select(t: torch.Tensor, rows: _Rows) -> torch.Tensor:
    return t if rows.kept is None else t.index_select(0, rows.kept)


def _same_sample(pair: Any, alone: Any) -> bool:
    """Whether the second half of a two-sample output is the one-sample output (up to rounding)."""
    if not (isinstance(pair, torch.Tensor) and isinstance(alone, torch.Tensor)) or alone.dim() == 0:
        return False
    if pair.shape[0] != 2 * alone.shape[0] or pair.shape[1:] != alone.shape[1:]:
        return False
    second = pair[alone.shape[0] :].double()
    scale = float(alone.double().abs().max()) if alone.numel() else 0.0
    if not math.isfinite(scale):  # NaN or Inf outputs: calibrated whole, where the checks name them
        return False
    return bool(torch.allclose(second, alone.double(), rtol=1e-4, atol=1e-5 * scale, equal_nan=True))


def _sample_signature(inputs: Any) -> tuple:
    """What one sample's layer outputs depend on: the shapes (batch dimension dropped) and dtypes of its tensors."""
    values = inputs.items() if isinstance(inputs, Mapping) else [("", inputs)]
    return tuple((key, tuple(value.shape[1:]), value.dtype) for key, value in values if isinstance(value, torch.Tensor))


def _row_weights(state: _LayerPass, sensitivity: str, weights: torch.Tensor | None) -> torch.Tensor:
    """``c-bar`` of one layer's rows, ``(N,)`` float64 (``sum_i c_i / out``; ones for ``local``), times
    the rows' sample weights where the layer's rows are the batch's tokens."""
    rows, spec = state.row_count, state.spec
    device = spec.module.weight.device if isinstance(spec.module.weight, torch.Tensor) else None
    if sensitivity == "local":
        row = torch.ones(rows, dtype=torch.float64, device=device)
    elif state.row_sum is None:
        row = torch.zeros(rows, dtype=torch.float64, device=device)
    else:
        row = state.row_sum / spec.fan_out
    if weights is not None and weights.numel() == rows:
        row = row * weights.to(device=row.device, dtype=torch.float64)
    return row


def _accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


class _LayerPass:
    """One layer during one batch: its captured input and what its gradients were reduced to."""

    def __init__(self, spec: LayerSpec) -> None:
        self.spec = spec
        self.raw_x: torch.Tensor | None = None  # the input as the layer saw it, while a pass still needs it
        self.rows = _Rows(None, None)
        self.samples = 0
        self.moments: Moments | None = None
        self.activation_sq_sum: torch.Tensor | None = None
        self.loss_grad_sum: torch.Tensor | None = None
        self.sensitivity: torch.Tensor | None = None  # (rows, out): sum_p g_p^2 (output)
        self.row_sum: torch.Tensor | None = None  # (N,) float64: sum_i c_i per row, padding included
        self.row_count = 0  # N, padding included
        self.gradients: list[torch.Tensor] = []  # every pass's (N, out) gradient (``gradients()`` only)
        self.loss_g: torch.Tensor | None = None

    def inputs(self) -> torch.Tensor:
        """The counted rows of the layer's ``(N, in)`` samples."""
        assert self.raw_x is not None
        return _select(self.spec.inputs_2d(self.raw_x), self.rows)


_STATISTICS, _GRADIENTS, _ROW_SENSITIVITIES = "statistics", "gradients", "row_sensitivities"


def _batches_note(batches: Any) -> str:
    """What a batch's error says instead of the general layout of batches when ``batches`` looks like
    one batch given alone (each of its items was taken as a batch); empty otherwise."""
    if isinstance(batches, torch.Tensor):
        return (
            "batches here is a tensor, whose rows were each taken as a batch; batches is an iterable of batches, "
            "so pass [inputs] for one batch"
        )
    if isinstance(batches, tuple) and len(batches) == 2:
        return (
            "batches here is a tuple of 2 items, each taken as a batch; batches is an iterable of batches, "
            "so if it is one (inputs, targets) batch, pass [(inputs, targets)]"
        )
    return ""


def _batch_iterator(batches: Iterable[Any]) -> Iterator[Any]:
    if batches is None:
        raise ValueError("argument 'batches' must be an iterable of inputs or (inputs, targets), got None")
    if isinstance(batches, Mapping):  # iterating it would give its keys, strings, as batches
        raise ValueError(
            f"argument 'batches' must be an iterable of batches, got one mapping (keys {list(batches)}); "
            "wrap a single batch in a list: [batch]"
        )
    try:
        return iter(batches)
    except TypeError:
        raise TypeError(
            f"argument 'batches' must be an iterable of inputs or (inputs, targets), got {type(batches).__name__}"
        ) from None


@dataclass
class _RunTotals:
    """What :meth:`Calibrator.run` accumulates over the batches."""

    statistics: dict[str, LayerStatistics | None]
    keep_inputs: bool
    kept_inputs: list[torch.Tensor] = field(default_factory=list)
    kept_count: int = 0
    inputs_complete: bool = True
    samples: int = 0
    batch_count: int = 0
    has_loss: bool | None = None
    row_sensitivities: list[dict[str, torch.Tensor]] | None = None

    def check_targets(self, use_loss: bool) -> None:
        """Every batch has targets, or none has."""
        if self.has_loss is None:
            self.has_loss = use_loss
        elif self.has_loss != use_loss:
            raise ValueError(
                f"argument 'batches': batch {self.batch_count} {'has' if use_loss else 'lacks'} targets "
                "unlike the first batch; give targets for every batch or for none"
            )

    def add(
        self, batch_statistics: dict[str, LayerStatistics], inputs: Any, rows: dict[str, torch.Tensor] | None = None
    ) -> None:
        """Merge one batch's statistics (and keep its row sensitivities); keep its inputs while they fit."""
        for name, stats in batch_statistics.items():
            self.statistics[name] = merge_statistics(self.statistics[name], stats)
        if self.row_sensitivities is not None and rows is not None:
            self.row_sensitivities.append(rows)
        batch_samples = count_samples(inputs)
        self.samples += batch_samples
        self.batch_count += 1
        if self.keep_inputs and self.inputs_complete:
            fits = self.kept_count + batch_samples <= MAX_STORED_SAMPLES
            if isinstance(inputs, torch.Tensor) and fits:
                self.kept_inputs.append(inputs.detach())
                self.kept_count += batch_samples
            else:  # too many samples to replay, or inputs that cannot be concatenated
                self.inputs_complete = False
                self.kept_inputs = []

    def result(self) -> CalibrationResult:
        """The result; ``ValueError`` when there was no batch or a layer never ran."""
        if self.batch_count == 0:
            raise ValueError("argument 'batches': the calibration data is empty (expected at least one batch, got 0)")
        if self.samples == 0:  # every importance would be 0: which weights go would be arbitrary
            raise ValueError(
                f"argument 'batches': the calibration data holds no sample to measure ({self.batch_count} batches of "
                "0 samples, or every position masked out by its attention mask); expected at least one"
            )
        missing = [name for name, stats in self.statistics.items() if stats is None]
        if missing:
            # Usually a layer the forward pass never calls (an auxiliary head), found by the default
            # discovery rather than named by the user: say how to leave it out.
            raise ValueError(
                f"argument 'layers': layers {missing} never ran: the model's forward pass called them on none of "
                f"the calibration batches ({self.batch_count} seen; an auxiliary or unused head, say), so they have no "
                f"statistics; leave them out with exclude={missing!r}, or name the layers to prune with layers=[...]"
            )
        logger.info(
            "calibrated %d layers on %d samples in %d batches", len(self.statistics), self.samples, self.batch_count
        )
        statistics = {name: stats for name, stats in self.statistics.items() if stats is not None}
        for name, stats in statistics.items():
            _check_statistics(name, stats)
        kept = self.kept_inputs
        return CalibrationResult(
            statistics=statistics,
            samples=self.samples,
            batches=self.batch_count,
            inputs=torch.cat(kept) if self.inputs_complete and kept else None,
            inputs_complete=self.inputs_complete and bool(kept),
            has_loss=bool(self.has_loss),
            row_sensitivities=self.row_sensitivities,
        )


#: Up to this many bytes of output gradients (directions x every scored layer's outputs of a batch),
#: the output sensitivity takes one batched backward pass (vmap) instead of one pass per direction:
#: much faster for few exact rows, while large models keep streaming one direction at a time.
BATCHED_BACKWARD_BYTES = 64 << 20
_BATCHED = "batched"
#: A batch whose sensitivities ``c`` (every scored layer's outputs, in the accumulation dtype) would
#: exceed this many bytes is calibrated in slices of whole samples that stay within it, so the graph
#: of a backward pass and the sensitivities grow with the slice, not the batch (for the ``output``
#: and ``loss`` sensitivities; see :meth:`Calibrator.run`).
SLICE_BYTES = 32 << 20


class _Slice(NamedTuple):
    """Samples ``start:stop`` of a batch of ``total`` samples."""

    start: int
    stop: int
    total: int


class _PassHooks:
    """The hooks of one forward pass: each layer's input captured, its gradients reduced as they arrive.

    ``mode`` says what a gradient becomes: the moments and sums of :meth:`Calibrator.run`
    (``statistics``), every gradient kept (``gradients``) or per-row sensitivities (``row_sensitivities``).
    """

    def __init__(
        self,
        layers: dict[str, LayerSpec],
        sensitivity: str,
        mode: str,
        check_finite: bool,
        use_loss: bool,
        weights: torch.Tensor | None,
        batch_index: int,
        *,
        keep_rows: bool = False,
    ) -> None:
        self.layers = layers
        self.sensitivity = sensitivity
        self.mode = mode
        self.check_finite = check_finite
        self.use_loss = use_loss
        self.weights = weights
        self.needs_graph = sensitivity != "local" or use_loss
        self.keep_rows = keep_rows or mode == _ROW_SENSITIVITIES
        self.batch_index = batch_index
        self.where = f"calibration batch {batch_index}:"
        self.error: Exception | None = None  # what a hook raised: already clear, passed on unchanged
        self.passes: dict[str, _LayerPass] = {}
        self.anchors: list[torch.Tensor] = []
        self.tapped: dict[str, torch.Tensor] = {}  # each layer's output, for the batched backward pass
        self.phase = "forward"
        self._row_cache: dict[int, _Rows] = {}

    def hook(self, name: str) -> Callable[..., torch.Tensor | None]:
        """The forward hook of layer ``name``."""

        def forward_hook(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor | None:
            try:
                return self._on_forward(name, args, output)
            except Exception as error:
                self.error = error  # the model call's error wrapper passes it on as it is
                raise

        return forward_hook

    def _on_forward(self, name: str, args: tuple, output: torch.Tensor) -> torch.Tensor | None:
        """Capture layer ``name``'s input and, when backward passes follow, tap its output."""
        if name in self.passes:
            raise RuntimeError(f"layer {name!r} ran twice in one forward pass; shared layers are not supported")
        self.on_input(name, layer_input(name, args).detach(), output)
        if not self.needs_graph:
            return None
        # A zero leaf added to z: differentiating with respect to the anchors drives the
        # backward pass through every z without capturing (and holding) their gradients,
        # and works when the layer's own parameters are frozen. The hook on the sum sees
        # dy/dz as soon as the backward pass reaches this layer.
        anchor = torch.zeros((), dtype=output.dtype, device=output.device, requires_grad=True)
        tapped = output + anchor
        tapped.register_hook(lambda grad: self.on_gradient(name, grad))
        self.anchors.append(anchor)
        self.tapped[name] = tapped
        return tapped

    def on_input(self, name: str, x: torch.Tensor, output: torch.Tensor) -> None:
        """Capture the layer's input; in statistics mode, its counted rows and their squares (and moments for local)."""
        state = self.passes[name] = _LayerPass(self.layers[name])
        if self.mode == _ROW_SENSITIVITIES:  # only the row count: no input held, no patches unfolded
            state.row_count = output.numel() // state.spec.fan_out
            return
        state.raw_x = x
        if self.mode != _STATISTICS:
            return
        spec = state.spec
        samples = spec.inputs_2d(x)
        state.row_count = int(samples.shape[0])
        state.rows = _row_selection(self.weights, samples.shape[0], self._row_cache)
        samples = _select(samples, state.rows)
        state.samples = int(samples.shape[0])
        scale = state.rows.scale
        squares = (
            samples.square() if scale is None else samples.square() * scale.square().to(samples.dtype).unsqueeze(1)
        )
        state.activation_sq_sum = squares.sum(dim=0)
        # The sums of squares are finite exactly when the inputs are and do not overflow: checking the
        # (in,) sums instead of the (N, in) inputs costs nothing; the inputs are read only to say which.
        if self.check_finite and not _finite(state.activation_sq_sum):
            _check_finite(samples, f"{self.where} the inputs of layer {name!r}", "activations")
            raise ValueError(
                f"{self.where} the squared inputs of layer {name!r} overflowed to Inf "
                "(expected finite sums; the activations are too large)"
            )
        if self.sensitivity == "local":
            g = samples.new_ones(samples.shape[0], spec.fan_out)
            if scale is not None:
                g = g * scale.to(g.dtype).unsqueeze(1)
            state.moments = fused_moments(samples, g)
            if not self.use_loss:
                state.raw_x = None  # nothing else needs this layer's input

    def on_gradient(self, name: str, grad: torch.Tensor) -> None:
        """Reduce one backward pass's gradient of a layer's output and let it go."""
        if self.phase == _BATCHED:
            return  # the batched pass returns its gradients; they are reduced one direction at a time
        state = self.passes[name]
        spec = state.spec
        g = spec.grads_3d(grad.detach().unsqueeze(0))[0]  # (N, out)
        # Output gradients that are reduced are checked once, reduced (check_sensitivities).
        if self.check_finite and (self.mode == _GRADIENTS or self.phase == "loss"):
            what = "loss gradients" if self.phase == "loss" else "output gradients"
            _check_finite(g, f"{self.where} the {what} of layer {name!r}", "gradients")
        if self.mode == _GRADIENTS:
            if self.phase == "loss":
                state.loss_g = g
            else:
                state.gradients.append(g)
            return
        self._add_row(state, g)
        if self.mode == _ROW_SENSITIVITIES:
            return
        g = _select(g, state.rows)
        scale = state.rows.scale
        if self.phase == "loss":
            x = state.inputs()
            state.loss_grad_sum = g.T.to(x.dtype) @ x  # dL/dW of the summed per-sample loss
            if self.sensitivity == "loss":
                weighted = g if scale is None else g * scale.to(g.dtype).unsqueeze(1)
                state.moments = fused_moments(x, weighted.to(x.dtype).unsqueeze(0))
            return
        squares = g.to(_accumulation_dtype(g.dtype)).square()
        if scale is not None:
            squares = squares * scale.square().to(squares.dtype).unsqueeze(1)
        state.sensitivity = squares if state.sensitivity is None else state.sensitivity.add_(squares)

    def _add_row(self, state: _LayerPass, g: torch.Tensor) -> None:
        """Add one pass's ``sum_i g_i^2`` per row (float64) to the layer's row sums, when they are kept."""
        if not self.keep_rows or (self.phase == "loss" and self.sensitivity != "loss"):
            return
        row = g.to(torch.float64).square().sum(dim=-1)
        state.row_sum = row if state.row_sum is None else state.row_sum.add_(row)

    def on_gradients(self, name: str, grads: torch.Tensor) -> None:
        """Reduce a batched pass's ``(P, *z.shape)`` gradients of one layer, as :meth:`on_gradient` would one by one."""
        state = self.passes[name]
        if self.mode != _STATISTICS:
            for row in grads:
                self.on_gradient(name, row)
            return
        g = state.spec.grads_3d(grads.detach())  # (P, N, out), the pass's own tensor: free to overwrite
        if self.keep_rows:  # before the squaring in place below
            for direction in g:
                self._add_row(state, direction)
        if state.rows.kept is not None:
            g = g.index_select(1, state.rows.kept)
        g = g.to(_accumulation_dtype(g.dtype))
        # Squared in place: a second (P, N, out) buffer costs more in fresh pages than the squaring.
        squares = g.square_() if g.is_contiguous() else g.square()
        if state.rows.scale is not None:
            squares = squares * state.rows.scale.square().to(squares.dtype).unsqueeze(1)
        # Added in direction order, like one pass per direction (a reduction over P may round differently).
        total = squares[0].clone() if state.sensitivity is None else state.sensitivity.add_(squares[0])
        for square in squares[1:]:
            total.add_(square)
        state.sensitivity = total

    def check_sensitivities(self) -> None:
        """``ValueError`` naming the first layer whose reduced output gradients are not finite.

        A sum of squares is finite exactly when every gradient is finite and small enough to square,
        so one check of the ``(N, out)`` sums replaces one check of every direction's gradient.
        """
        if not self.check_finite or self.mode == _GRADIENTS:
            return
        for name, state in self.passes.items():
            sums = [t for t in (state.sensitivity, state.row_sum) if t is not None]
            if not all(_finite(t) for t in sums):
                raise ValueError(
                    f"{self.where} the output gradients of layer {name!r} contain NaN or Inf, or values too "
                    "large to square (expected finite gradients)"
                )


class Calibrator:
    """Streams :class:`LayerStatistics` of ``layers`` over calibration batches.

    Args:
        model: the network; run in eval mode during calibration (its mode is restored).
        layers: the layers to calibrate, from :func:`resolve_layers`.
        sensitivity: ``"output"`` (``c = ||dy/dz||^2``), ``"loss"`` (per-sample loss gradients) or
            ``"local"`` (``c = 1``, no backward pass).
        probes: Rademacher probes for ``"output"``; None means exact Jacobian rows up to
            :data:`MAX_EXACT_OUTPUTS` outputs and :data:`DEFAULT_PROBES` probes above.
        loss_fn: ``loss_fn(outputs, targets)``; needed by ``"loss"`` and by the gradient baselines.
        loss_reduction: how ``loss_fn`` reduces over the batch: ``"mean"``, ``"sum"``, or None to read
            ``loss_fn.reduction`` (default ``"mean"``). A non-scalar loss is summed.
        output_fn: maps the model's return value to the output tensor ``y``; the default
            (:func:`~ecp_fast.pruning.batches.model_output`) takes a tensor as it is, the ``logits`` of
            a Hugging Face output, or the first tensor of a tuple. Only used when a backward pass is.
        seed: seeds the Rademacher probes.
        keep_inputs: keep up to :data:`MAX_STORED_SAMPLES` model inputs for the ``nonlinear`` baseline.

    Each output or loss backward pass delivers one layer's gradient at a time to a hook that reduces
    it (to ``c`` or to the moments) and frees it, so the extra memory of ``"output"`` is the
    forward graph plus one ``(N, out)`` sensitivity per layer, whatever the number of probes. Both
    grow with the samples of a pass, so a batch whose sensitivities would exceed :data:`SLICE_BYTES`
    is calibrated in slices of whole samples (tensor and mapping inputs, split along their first
    dimension). Once per shape of sample, passes without a graph on samples ``0:2`` and ``1:2`` measure
    the size and check that the first dimension holds independent samples (sample 1's output the same
    alone); where it does not (a sequence-first model), batches stay whole. The slices replay the
    batch's probe draws, so the statistics are the whole batch's up to rounding. A mean-reduced loss
    is rescaled per slice as it is per batch (by the slice's samples), which is exact for a mean over
    samples or over equally many tokens per sample; a token mean over padded sequences of unequal
    length weights each slice as a separate batch would.
    """

    @renamed_keyword("criterion", "sensitivity")
    def __init__(
        self,
        model: nn.Module,
        layers: dict[str, LayerSpec],
        sensitivity: str = "output",
        *,
        probes: int | None = None,
        loss_fn: LossFn | None = None,
        loss_reduction: str | None = None,
        output_fn: Callable[[Any], torch.Tensor] | None = None,
        seed: int = 0,
        keep_inputs: bool = True,
    ) -> None:
        if sensitivity not in SENSITIVITIES:
            raise ValueError(f"argument 'sensitivity' must be one of {SENSITIVITIES}, got {sensitivity!r}")
        if probes is not None and (not isinstance(probes, int) or isinstance(probes, bool) or probes < 1):
            raise ValueError(f"argument 'probes' must be a positive integer or None, got {probes!r}")
        if sensitivity == "loss" and loss_fn is None:
            raise ValueError("argument 'loss_fn' is required with sensitivity='loss', got None")
        if loss_fn is not None and not callable(loss_fn):
            raise TypeError(f"argument 'loss_fn' must be a callable (outputs, targets) -> loss, got {loss_fn!r}")
        if output_fn is not None and not callable(output_fn):
            raise TypeError(f"argument 'output_fn' must be a callable (outputs) -> tensor, got {output_fn!r}")
        if loss_reduction is None:
            loss_reduction = getattr(loss_fn, "reduction", "mean")
        if loss_reduction not in ("mean", "sum", "none"):
            raise ValueError(f"argument 'loss_reduction' must be 'mean', 'sum' or 'none', got {loss_reduction!r}")
        self.model = model
        self.layers = layers
        self.sensitivity = sensitivity
        self.probes = probes
        self.loss_fn = loss_fn
        self.loss_reduction = loss_reduction
        self.output_fn = output_fn
        self.seed = seed
        self.keep_inputs = keep_inputs
        self._row_bytes_seen: dict[tuple, int | None] = {}  # sensitivity bytes of one sample, by its shapes
        self._keep_rows = False  # whether run() keeps each batch's row sensitivities
        self._batches_note = ""  # during run(): what a batch's error adds about the whole of its batches

    # The public entry point -------------------------------------------------------------------------

    def run(
        self, batches: Iterable[Any], progress: bool = True, *, row_sensitivities: bool = False
    ) -> CalibrationResult:
        """Stream every batch once; raise ``ValueError`` on empty data or non-finite values.

        With ``row_sensitivities`` the result also keeps, per batch, what :meth:`row_sensitivities`
        returns for it (bit for bit, from the same passes): what ``ecp-obs`` weights its Gram
        matrices by, without a second pass over the batches.

        ``samples`` counts what the statistics count: rows of tensor inputs, real (non-padding)
        tokens of inputs with an attention mask (see :func:`~ecp_fast.pruning.batches.count_samples`).
        """
        iterator = _batch_iterator(batches)
        device = module_device(self.model)
        generator = torch.Generator(device=device)
        generator.manual_seed(self.seed)
        totals = _RunTotals({name: None for name in self.layers}, self.keep_inputs)
        self._row_bytes_seen = {}
        self._keep_rows = row_sensitivities
        totals.row_sensitivities = [] if row_sensitivities else None
        total = known_length(batches)  # no progress total for a stream of unknown length
        self._batches_note = _batches_note(batches)
        try:
            with eval_mode(self.model):  # dropout off and batch norm frozen: samples stay independent
                for batch in tqdm(iterator, total=total, desc="calibrate", disable=not progress, leave=False):
                    self._run_batch(batch, device, generator, totals)
        finally:
            self._batches_note = ""
        return totals.result()

    def _run_batch(self, batch: Any, device: torch.device, generator: torch.Generator, totals: _RunTotals) -> None:
        """One batch of :meth:`run`: its statistics merged into ``totals``."""
        inputs, targets = split_batch(batch)
        inputs = to_device(inputs, device)
        targets = to_device(targets, device)
        use_loss = self.loss_fn is not None and targets is not None
        if self.sensitivity == "loss" and targets is None:
            raise ValueError(
                f"argument 'batches': sensitivity='loss' needs (inputs, targets) batches, batch {totals.batch_count} "
                f"has no targets{'; ' + self._batches_note if self._batches_note else ''}"
            )
        totals.check_targets(use_loss)
        targets = targets if use_loss else None
        slices = self._slices(inputs, targets, use_loss, totals.batch_count)
        if slices is None:
            statistics, rows = self._batch_statistics(inputs, targets, generator, totals.batch_count)
        else:
            statistics, rows = self._sliced_statistics(inputs, targets, generator, totals.batch_count, slices)
        totals.add(statistics, inputs, rows)

    def _sliced_statistics(
        self, inputs: Any, targets: Any, generator: torch.Generator, batch_index: int, slices: list[_Slice]
    ) -> tuple[dict[str, LayerStatistics], dict[str, torch.Tensor] | None]:
        """:meth:`_batch_statistics` of a batch, one slice at a time; the slices' statistics merged and
        their row sensitivities joined in order. Every slice replays the batch's probe draws and keeps
        its own rows of them, so the probes (and so the statistics, up to rounding) are the batch's."""
        start_state = generator.get_state()
        merged: dict[str, LayerStatistics] = {}
        parts: dict[str, list[torch.Tensor]] = {}
        for rows in slices:
            generator.set_state(start_state)
            part_inputs, part_targets = (slice_rows(value, *rows) for value in (inputs, targets))
            statistics, row_weights = self._batch_statistics(part_inputs, part_targets, generator, batch_index, rows)
            for name, stats in statistics.items():
                merged[name] = merge_statistics(merged.get(name), stats)
            for name, row in (row_weights or {}).items():
                parts.setdefault(name, []).append(row)
            del statistics, row_weights  # merged: not to be held through the next slice's passes
        return merged, {name: torch.cat(rows) for name, rows in parts.items()} if self._keep_rows else None

    def _slices(self, inputs: Any, targets: Any, use_loss: bool, batch_index: int) -> list[_Slice] | None:
        """The slices of a batch whose backward passes would hold more than :data:`SLICE_BYTES`; None: whole."""
        rows = batch_rows(inputs, targets)
        if rows is None or rows < 2 or not (self.sensitivity != "local" or use_loss):
            return None
        signature = _sample_signature(inputs)
        if signature not in self._row_bytes_seen:  # one probe per shape of sample, not per batch
            self._row_bytes_seen[signature] = self._sample_bytes(inputs, rows, batch_index)
        row_bytes = self._row_bytes_seen[signature]
        per_slice = rows if row_bytes is None else max(1, SLICE_BYTES // max(row_bytes, 1))
        if per_slice >= rows:
            return None
        return [_Slice(start, min(start + per_slice, rows), rows) for start in range(0, rows, per_slice)]

    def _sample_bytes(self, inputs: Any, rows: int, batch_index: int) -> int | None:
        """Bytes of every scored layer's sensitivities per sample, from passes without a graph on samples
        ``0:2`` and ``1:2``; None when sample 1's output depends on sample 0, so that the first dimension
        does not hold independent samples (a sequence-first model, say) and slicing would change it."""
        sizes: list[int] = []

        def measure(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            sizes.append(output.numel() * torch.empty((), dtype=_accumulation_dtype(output.dtype)).element_size())

        # The first model call of a batch may be this one: its failures name the batch (and the whole
        # batch's inputs, which are what the user gave).
        handles = [spec.module.register_forward_hook(measure) for spec in self.layers.values()]
        try:
            with torch.no_grad():
                with self._model_errors(inputs, batch_index):
                    raw_pair = call_model(self.model, slice_rows(inputs, 0, 2, rows))
                pair = self._output(raw_pair, batch_index)
        finally:
            for handle in handles:
                handle.remove()
        with torch.no_grad():
            with self._model_errors(inputs, batch_index):
                raw_alone = call_model(self.model, slice_rows(inputs, 1, 2, rows))
            alone = self._output(raw_alone, batch_index)
        return sum(sizes) // 2 if _same_sample(pair, alone) else None

    def _model_errors(
        self, inputs: Any, batch_index: int, own: Callable[[Exception], bool] | None = None
    ) -> contextlib.AbstractContextManager[None]:
        """:func:`~ecp_fast.pruning.batches.model_errors` for this model, with what :meth:`run` knows of its batches."""
        return model_errors(self.model, inputs, batch_index, own=own, note=self._batches_note)

    def _output(self, raw_output: Any, batch_index: int) -> Any:
        """The output tensor of what the model returned, through ``output_fn``; a user's ``output_fn``
        that fails is named (the default one's own errors say what to do)."""
        if self.output_fn is None:
            return model_output(raw_output)
        try:
            return self.output_fn(raw_output)
        except Exception as error:
            if passes_through(error):
                raise
            raise ValueError(
                f"argument 'output_fn': it raised {type(error).__name__} on what the model returned for batch "
                f"{batch_index} ({describe(raw_output)}): {error}"
            ) from error

    # One batch, three ways of reducing it ------------------------------------------------------------

    def gradients(
        self,
        inputs: Any,
        targets: Any = None,
        generator: torch.Generator | None = None,
        batch_index: int = 0,
        check_finite: bool = True,
    ) -> dict[str, LayerGradients]:
        """One batch, unreduced: every layer's inputs ``(N, in)``, sensitivity gradients ``(P, N, out)``
        (None for ``sensitivity="local"``) and per-sample loss gradients ``(N, out)`` (None without targets).

        Every row is returned, padding included (:func:`~ecp_fast.pruning.batches.sample_weights`
        tells which count). This holds every layer's gradients of every pass at once: for small
        models and tests; calibration itself streams (:meth:`run`, :meth:`row_sensitivities`).
        With ``check_finite`` raises ``ValueError`` when an input or gradient is NaN or Inf.
        """
        passes = self._pass(inputs, targets, generator, batch_index, _GRADIENTS, check_finite)
        result = {}
        for name, state in passes.items():
            spec = state.spec
            x = state.inputs()  # every row: gradients() selects none
            count = len(state.gradients)
            if self.sensitivity == "loss":
                g = None if state.loss_g is None else state.loss_g.unsqueeze(0)
                if g is None and targets is not None:
                    g = x.new_zeros(1, x.shape[0], spec.fan_out)
            elif self.sensitivity == "output":
                g = torch.stack(state.gradients) if count else x.new_zeros(self._pass_count, x.shape[0], spec.fan_out)
            else:
                g = None
            loss_g = state.loss_g
            if loss_g is None and targets is not None and self.loss_fn is not None:
                loss_g = x.new_zeros(x.shape[0], spec.fan_out)
            result[name] = LayerGradients(x=x, g=g, loss_g=loss_g)
            if check_finite:
                _check_finite(x, f"calibration batch {batch_index}: the inputs of layer {name!r}", "activations")
        return result

    def row_sensitivities(
        self, inputs: Any, targets: Any = None, generator: torch.Generator | None = None, batch_index: int = 0
    ) -> dict[str, torch.Tensor]:
        """One batch: per layer, the row mean of the sensitivities ``c-bar_s = (1/out) sum_i c_i^s``, ``(N,)``
        float64, times the sample's weight (0 for padding tokens); ones for ``sensitivity="local"``.

        Streamed like :meth:`run` (one layer's gradient at a time): the per-sample weights of a
        reconstruction's Gram matrix without holding ``(P, N, out)`` gradients.
        """
        passes = self._pass(inputs, targets, generator, batch_index, _ROW_SENSITIVITIES, True)
        weights = sample_weights(inputs)
        return {name: _row_weights(state, self.sensitivity, weights) for name, state in passes.items()}

    def _batch_statistics(
        self, inputs: Any, targets: Any, generator: torch.Generator, batch_index: int, rows: _Slice | None = None
    ) -> tuple[dict[str, LayerStatistics], dict[str, torch.Tensor] | None]:
        """One batch's (or slice's) statistics per layer, and its row sensitivities when :meth:`run` keeps them."""
        passes = self._pass(
            inputs, targets, generator, batch_index, _STATISTICS, True, rows=rows, keep_rows=self._keep_rows
        )
        weights = sample_weights(inputs) if self._keep_rows else None
        row_weights = None
        if self._keep_rows:
            row_weights = {name: _row_weights(state, self.sensitivity, weights) for name, state in passes.items()}
        result = {}
        for name, state in passes.items():
            spec = state.spec
            if state.moments is None:  # output sensitivity (c accumulated), or a layer no gradient reached
                x = state.inputs()
                c = state.sensitivity
                if c is None:
                    c = x.new_zeros(x.shape[0], spec.fan_out)
                state.moments = fused_moments(x, c.sqrt_().to(x.dtype).unsqueeze(0))  # c is this pass's own
                state.sensitivity = None
            activation_sq_sum = state.activation_sq_sum
            assert activation_sq_sum is not None  # on_input sets it in statistics mode
            loss_grad_sum = state.loss_grad_sum
            if loss_grad_sum is None and targets is not None and self.loss_fn is not None:
                loss_grad_sum = torch.zeros(
                    spec.fan_out, spec.fan_in, dtype=activation_sq_sum.dtype, device=activation_sq_sum.device
                )
            state.raw_x = None
            stats = LayerStatistics(
                moments=state.moments,
                activation_sq_sum=activation_sq_sum,
                loss_grad_sum=loss_grad_sum,
                samples=state.samples,
            )
            result[name] = stats
        return result, row_weights

    # The pass itself ---------------------------------------------------------------------------------

    def _pass(
        self,
        inputs: Any,
        targets: Any,
        generator: torch.Generator | None,
        batch_index: int,
        mode: str,
        check_finite: bool,
        *,
        rows: _Slice | None = None,
        keep_rows: bool = False,
    ) -> dict[str, _LayerPass]:
        """Forward with hooks, then the loss and output backward passes, reducing as gradients arrive."""
        if generator is None:
            generator = torch.Generator(device=module_device(self.model))
            generator.manual_seed(self.seed)
        use_loss = targets is not None and self.loss_fn is not None
        if self.sensitivity == "loss" and not use_loss:
            raise ValueError("sensitivity='loss' needs targets and loss_fn for every batch")
        weights = sample_weights(inputs)
        if weights is not None:
            weights = weights.to(module_device(self.model))
        hooks = _PassHooks(
            self.layers, self.sensitivity, mode, check_finite, use_loss, weights, batch_index, keep_rows=keep_rows
        )
        if hooks.needs_graph and torch.is_inference_mode_enabled():
            # Inference mode cannot be left from inside (set_grad_enabled does not), and no tensor made
            # under it records a graph: say so before the first hook fails with autograd's own words.
            needs = f"sensitivity={self.sensitivity!r}" if self.sensitivity != "local" else "loss_fn with targets"
            raise RuntimeError(
                f"calibration with {needs} needs autograd (output and loss sensitivities are gradients) and cannot "
                "run under torch.inference_mode(); call it outside inference mode (inside torch.no_grad() is "
                "fine: calibration enables gradients where it needs them), or use sensitivity='local' without "
                "loss_fn"
            )
        # No parameter gradient is ever needed (dL/dW is streamed from dL/dz and a): with the
        # parameters frozen, the graph saves only what the gradients with respect to z need
        # (about a third less on a transformer block).
        trainable = (
            [parameter for parameter in self.model.parameters() if parameter.requires_grad] if hooks.needs_graph else []
        )
        self._pass_count = 0
        try:
            for parameter in trainable:
                parameter.requires_grad_(False)
            output = self._forward(hooks, inputs)  # the model's raw return value is not kept past this call
            if output is not None:
                self._backward_passes(hooks, output, targets, weights, generator, rows)
                hooks.check_sensitivities()
        finally:
            for parameter in trainable:
                parameter.requires_grad_(True)
            # Each tapped output holds a hook that holds these hooks: a cycle through the whole graph
            # that only the cyclic garbage collector would free. Broken here, the graph goes now.
            hooks.tapped.clear()
            hooks.anchors.clear()
            # A hook's error reaches these hooks through its traceback's frames: another cycle through
            # the graph, which even a collection was seen not to free (it passes through autograd's hooks).
            hooks.error = None
        return hooks.passes

    def _forward(self, hooks: _PassHooks, inputs: Any) -> torch.Tensor | None:
        """The forward pass with the hooks in place; the output tensor when backward passes follow."""
        handles = [spec.module.register_forward_hook(hooks.hook(name)) for name, spec in self.layers.items()]
        try:
            with (
                torch.set_grad_enabled(hooks.needs_graph),
                self._model_errors(inputs, hooks.batch_index, own=lambda error: error is hooks.error),
            ):
                raw_output = call_model(self.model, inputs)
        finally:
            for handle in handles:
                handle.remove()
        if not hooks.needs_graph:
            return None
        output = self._output(raw_output, hooks.batch_index)
        if not isinstance(output, torch.Tensor):
            raise TypeError(f"argument 'output_fn' must return a tensor, got {type(output).__name__}")
        return output

    def _backward_passes(
        self,
        hooks: _PassHooks,
        output: torch.Tensor,
        targets: Any,
        weights: torch.Tensor | None,
        generator: torch.Generator,
        rows: _Slice | None,
    ) -> None:
        """The loss backward pass (with targets), then one output backward pass per probe direction."""
        if hooks.use_loss:
            hooks.phase = "loss"
            total = self._loss_total(output, targets, hooks.batch_index)
            self._backward(total, hooks.anchors, None, retain=self.sensitivity == "output")
            del total
        if self.sensitivity == "output":
            directions = self._directions(output, weights, generator, rows)
            self._pass_count = len(directions)
            if self._fits_batched(hooks, len(directions)):
                self._batched_output_pass(hooks, output, directions)
                return
            hooks.phase = "output"
            for index in range(len(directions)):
                self._backward(output, hooks.anchors, directions[index](), retain=index < len(directions) - 1)

    @staticmethod
    def _fits_batched(hooks: _PassHooks, directions: int) -> bool:
        """Whether every layer's gradients for every direction fit :data:`BATCHED_BACKWARD_BYTES` at once."""
        values = sum(tapped.numel() * tapped.element_size() for tapped in hooks.tapped.values())
        return 0 < directions * values <= BATCHED_BACKWARD_BYTES

    @staticmethod
    def _batched_output_pass(hooks: _PassHooks, output: torch.Tensor, directions: list) -> None:
        """All directions in one batched backward pass, then each layer's gradients reduced as in the loop."""
        names = [name for name in hooks.tapped if hooks.tapped[name].requires_grad]
        if not names or not output.requires_grad:
            return
        hooks.phase = _BATCHED
        stacked = torch.stack([direction() for direction in directions])
        try:
            grads = torch.autograd.grad(
                output,
                [hooks.tapped[name] for name in names],
                grad_outputs=stacked,
                is_grads_batched=True,
                allow_unused=True,
            )
        except RuntimeError as error:  # an op without a batching rule: one pass per direction instead
            logger.info("batched backward failed (%s); one backward pass per direction", error)
            hooks.phase = "output"
            for index, direction in enumerate(directions):
                Calibrator._backward(output, hooks.anchors, direction(), retain=index < len(directions) - 1)
            return
        hooks.phase = "output"
        for name, grad in zip(names, grads, strict=True):
            if grad is not None:
                hooks.on_gradients(name, grad)

    @staticmethod
    def _backward(
        target: torch.Tensor, anchors: list[torch.Tensor], grad_outputs: torch.Tensor | None, retain: bool
    ) -> None:
        if not anchors or not target.requires_grad:
            return  # nothing scored reaches the output: every gradient is zero
        torch.autograd.grad(target, anchors, grad_outputs=grad_outputs, retain_graph=retain, allow_unused=True)

    def _loss_total(self, output: torch.Tensor, targets: Any, batch_index: int) -> torch.Tensor:
        """The batch loss rescaled to a sum of per-sample losses."""
        assert self.loss_fn is not None
        try:
            loss = self.loss_fn(output, targets)
        except Exception as error:
            if passes_through(error):
                raise
            # Most often targets that do not fit the outputs (another batch size, another shape).
            details = f"outputs: {describe(output)}; targets: {describe(targets)}"
            layout = self._batches_note or BATCHES_HINT
            hint = f"each batch's targets must fit the model's outputs as loss_fn expects ({layout})"
            raise batch_error("loss_fn(outputs, targets)", batch_index, details, error, hint) from error
        if not isinstance(loss, torch.Tensor):
            raise TypeError(f"argument 'loss_fn' must return a tensor, got {type(loss).__name__}")
        if loss.dim() > 0:
            total = loss.sum()
        elif self.loss_reduction == "mean":
            # A mean over the batch: scale so that each sample's loss has weight one.
            total = loss * (output.shape[0] if output.dim() > 0 else 1)
        else:
            total = loss
        if not torch.isfinite(total):
            raise ValueError(f"the loss is {total.item()} (expected a finite value)")
        return total

    def _directions(
        self, output: torch.Tensor, weights: torch.Tensor | None, generator: torch.Generator, rows: _Slice | None
    ) -> list[Callable[[], torch.Tensor]]:
        """One ``grad_outputs`` per backward pass, made when it runs: exact Jacobian rows (output ``k``
        of every sample) or Rademacher probes scaled by ``1/sqrt(P)``; outputs at padding positions get 0.

        For a slice of a batch (``rows``) the probes are drawn for the whole batch and sliced.
        """
        batch = output.shape[0] if output.dim() > 1 else 1
        drawn = (0, batch, batch) if rows is None or rows.stop - rows.start != batch else rows
        outputs = output.numel() // batch if batch else 0
        token_mask = None
        if weights is not None and output.dim() >= 2 and output.shape[0] * output.shape[1] == weights.numel():
            token_mask = weights.to(output.dtype).reshape(output.shape[0], output.shape[1], *[1] * (output.dim() - 2))
        probes = self.probes
        if probes is None and outputs > MAX_EXACT_OUTPUTS:
            probes = DEFAULT_PROBES

        def masked(direction: torch.Tensor) -> torch.Tensor:
            direction = direction.reshape(output.shape)
            return direction if token_mask is None else direction * token_mask

        if probes is None:

            def row(k: int) -> Callable[[], torch.Tensor]:
                def make() -> torch.Tensor:
                    direction = torch.zeros(batch, outputs, dtype=output.dtype, device=output.device)
                    direction[:, k] = 1
                    return masked(direction)

                return make

            return [row(k) for k in range(outputs)]

        def probe() -> torch.Tensor:
            # Drawn in order, one probe per pass: the same stream as drawing (P, batch, outputs) at once.
            signs = torch.randint(0, 2, (drawn[2], outputs), generator=generator, device=output.device)
            signs = signs[drawn[0] : drawn[1]]
            # Scaled by 1/sqrt(P) so that sum_p g_p^2 is the unbiased estimate (1/P) sum_p (v_p^T J)^2.
            return masked((signs.to(output.dtype) * 2 - 1) / probes**0.5)

        return [probe] * probes
