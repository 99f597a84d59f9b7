"""Calibration: stream per-layer statistics through forward hooks and batched backward passes.

For every scored layer and every calibration batch, a forward hook captures the layer's input ``a``
and pre-activation ``z``; one batched backward pass then gives the output gradients ``g = dy/dz``
(exact Jacobian rows, Rademacher probes, per-sample loss gradients, or ``c = 1``, METHOD.md), and
``ecp_fast.moments`` turns ``(a, g)`` into the sensitivity-weighted moments of the batch. Batches are
merged with :func:`merge_statistics`, so memory does not grow with the number of samples. The same
pass streams what the baselines need: ``sum_s a_j^2`` (wanda) and the summed loss gradient
``dL/dW`` (gradient, taylor).

Everything a distributed job must reduce lives in :class:`LayerStatistics` and is merged by the one
function :func:`merge_statistics` (moments merge exactly, the sums add).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, NamedTuple, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ecp_fast._deprecation import renamed_keyword
from ecp_fast.ops.merge import Moments, merge_moments
from ecp_fast.pruning.batches import module_device, split_batch, to_device
from ecp_fast.ops import moments as fused_moments

logger = logging.getLogger(__name__)

SENSITIVITIES = ("output", "loss", "local")
#: Up to this many model outputs the exact Jacobian rows are computed; above it, Rademacher probes.
MAX_EXACT_OUTPUTS = 32
#: Probes used when the outputs are too many for exact rows and ``probes`` was not given.
DEFAULT_PROBES = 16
#: The ``nonlinear`` baseline replays the calibration inputs; at most this many are kept for it.
MAX_STORED_SAMPLES = 1024

LossFn = Callable[[torch.Tensor, Any], torch.Tensor]


# ---- layers ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LayerSpec:
    """A scored layer: its qualified name, the module and its kind (``"linear"`` or ``"conv2d"``)."""

    name: str
    module: nn.Module
    kind: str

    @property
    def fan_out(self) -> int:
        """Output neurons (rows of the ``(out, in)`` weight view)."""
        return int(weight_parameter(self.module).shape[0])

    @property
    def fan_in(self) -> int:
        """Inputs per neuron (columns of the ``(out, in)`` weight view; ``C kh kw`` for a conv)."""
        return int(weight_parameter(self.module)[0].numel())

    def inputs_2d(self, x: torch.Tensor) -> torch.Tensor:
        """Layer input as ``(N, in)`` samples: tokens for a Linear, unfolded patches for a Conv2d."""
        if self.kind == "linear":
            return x.reshape(-1, x.shape[-1])
        conv = self.module
        if x.dim() == 3:  # unbatched (C, H, W)
            x = x.unsqueeze(0)
        patches = F.unfold(
            x, kernel_size=conv.kernel_size, dilation=conv.dilation, padding=_conv_padding(conv), stride=conv.stride
        )  # (B, C kh kw, L), columns in the order of weight.reshape(out, -1)
        return patches.transpose(1, 2).reshape(-1, patches.shape[1])

    def grads_3d(self, g: torch.Tensor) -> torch.Tensor:
        """Gradients ``(P, *z.shape)`` as ``(P, N, out)``, samples ordered like :meth:`inputs_2d`."""
        if self.kind == "linear":
            return g.reshape(g.shape[0], -1, g.shape[-1])
        if g.dim() == 4:  # unbatched conv output (P, out, H, W)
            g = g.unsqueeze(1)
        # (P, B, out, H, W) -> (P, B, H, W, out): output positions in unfold's row-major order.
        return g.permute(0, 1, 3, 4, 2).reshape(g.shape[0], -1, g.shape[2])


def _conv_padding(conv: nn.Conv2d) -> tuple[int, int]:
    padding = conv.padding
    if padding == "valid":
        return (0, 0)
    if padding == "same":
        # nn.Conv2d pads 'same' asymmetrically when the total padding is odd; unfold cannot.
        total = [d * (k - 1) for d, k in zip(conv.dilation, conv.kernel_size)]
        if any(t % 2 for t in total):
            raise ValueError(
                f"Conv2d padding='same' with kernel_size={conv.kernel_size} and dilation={conv.dilation} "
                "pads asymmetrically, which is not supported; use an explicit integer padding"
            )
        return (total[0] // 2, total[1] // 2)
    return tuple(padding)  # type: ignore[return-value]


def weight_parameter(module: nn.Module) -> torch.Tensor:
    """The stored weight tensor: ``weight_orig`` under ``torch.nn.utils.prune``, else ``weight``."""
    return module.weight_orig if hasattr(module, "weight_orig") else module.weight


def existing_mask(module: nn.Module) -> torch.Tensor | None:
    """The ``torch.nn.utils.prune`` mask of the weight, or None when the weight is not masked."""
    return getattr(module, "weight_mask", None)


def weight_2d(module: nn.Module) -> torch.Tensor:
    """The effective weight (mask applied) viewed as ``(out, in)``, detached."""
    weight = weight_parameter(module).detach()
    mask = existing_mask(module)
    if mask is not None:
        weight = weight * mask
    return weight.reshape(weight.shape[0], -1)


def _unsupported_reason(module: nn.Module) -> str | None:
    if isinstance(module, nn.Linear):
        return None
    if isinstance(module, nn.Conv2d):
        if module.groups != 1:
            return f"Conv2d with groups={module.groups} is not supported (expected groups=1)"
        if module.padding_mode != "zeros":
            return f"Conv2d with padding_mode={module.padding_mode!r} is not supported (expected 'zeros')"
        return None
    return f"{type(module).__name__} is not supported (expected nn.Linear or nn.Conv2d)"


def resolve_layers(model: nn.Module, layers: Sequence[str] | None = None) -> dict[str, LayerSpec]:
    """The layers to score, in module order.

    ``layers=None`` takes every ``nn.Linear`` and supported ``nn.Conv2d`` (unsupported convolutions
    are skipped with a warning). Named layers must exist and be supported, else ``ValueError``.
    """
    modules = dict(model.named_modules())
    if layers is None:
        specs: dict[str, LayerSpec] = {}
        for name, module in modules.items():
            if not isinstance(module, (nn.Linear, nn.Conv2d)):
                continue
            reason = _unsupported_reason(module)
            if reason is not None:
                logger.warning("skipping layer %r: %s", name, reason)
                continue
            specs[name] = LayerSpec(name, module, "linear" if isinstance(module, nn.Linear) else "conv2d")
        if not specs:
            raise ValueError("argument 'layers': the model has no nn.Linear or supported nn.Conv2d layer to prune")
        return specs
    if isinstance(layers, str):
        raise TypeError(f"argument 'layers' must be a sequence of layer names, got the string {layers!r}")
    names = list(layers)
    if not names:
        raise ValueError("argument 'layers' must name at least one layer, got an empty sequence")
    specs = {}
    for name in names:
        if name not in modules or name == "":
            linear_like = [n for n, m in modules.items() if isinstance(m, (nn.Linear, nn.Conv2d))]
            raise ValueError(
                f"argument 'layers': no module named {name!r} in the model; prunable layers are {linear_like}"
            )
        reason = _unsupported_reason(modules[name])
        if reason is not None:
            raise ValueError(f"argument 'layers': layer {name!r} cannot be pruned: {reason}")
        module = modules[name]
        specs[name] = LayerSpec(name, module, "linear" if isinstance(module, nn.Linear) else "conv2d")
    return specs


# ---- statistics ------------------------------------------------------------------------------------


@dataclass
class LayerStatistics:
    """What calibration accumulated for one layer; every field is a sum over samples.

    ``moments`` are the sensitivity-weighted moments ``(s0, mean, m2)`` (METHOD.md);
    ``activation_sq_sum`` ``(in,)`` is ``sum_s a_j^2``; ``loss_grad_sum`` ``(out, in)`` is the
    gradient of the summed per-sample loss (None when no loss was given); ``samples`` counts rows.
    """

    moments: Moments
    activation_sq_sum: torch.Tensor
    loss_grad_sum: torch.Tensor | None = None
    samples: int = 0


def merge_statistics(a: LayerStatistics | None, b: LayerStatistics) -> LayerStatistics:
    """Merge the statistics of two disjoint sample sets (batches, or ranks of a distributed job)."""
    if a is None:
        return b
    if (a.loss_grad_sum is None) != (b.loss_grad_sum is None):
        raise ValueError("merge_statistics: both parts must have loss gradients, or neither")
    return LayerStatistics(
        moments=merge_moments(a.moments, b.moments),
        activation_sq_sum=a.activation_sq_sum + b.activation_sq_sum,
        loss_grad_sum=None if a.loss_grad_sum is None else a.loss_grad_sum + b.loss_grad_sum,
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


class LayerGradients(NamedTuple):
    """One batch of one layer: inputs ``x`` ``(N, in)``, gradients ``g`` ``(P, N, out)`` or None
    (``c = 1``), per-sample loss gradients ``loss_g`` ``(N, out)`` or None."""

    x: torch.Tensor
    g: torch.Tensor | None
    loss_g: torch.Tensor | None


def _check_finite(t: torch.Tensor, what: str, expected: str) -> None:
    # A float64 sum is NaN or Inf exactly when an element is (float32 data cannot overflow it), and
    # it reads the tensor once without allocating a mask.
    if not bool(torch.isfinite(t.sum(dtype=torch.float64))):
        raise ValueError(f"{what} contain NaN or Inf (expected finite {expected})")


def _check_layer_gradients(grads: LayerGradients, name: str, batch_index: int) -> None:
    where = f"calibration batch {batch_index}:"
    _check_finite(grads.x, f"{where} the inputs of layer {name!r}", "activations")
    if grads.g is not None:
        _check_finite(grads.g, f"{where} the output gradients of layer {name!r}", "gradients")
    if grads.loss_g is not None:
        _check_finite(grads.loss_g, f"{where} the loss gradients of layer {name!r}", "gradients")


# ---- the streaming pass ------------------------------------------------------------------------------


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
        output_fn: maps the model's return value to the output tensor ``y`` (default: identity).
        seed: seeds the Rademacher probes.
        keep_inputs: keep up to :data:`MAX_STORED_SAMPLES` model inputs for the ``nonlinear`` baseline.
    """

    @renamed_keyword("criterion", "sensitivity")
    def __init__(
        self,
        model: nn.Module,
        layers: dict[str, LayerSpec],
        sensitivity: str = "output",
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

    # The public entry point -------------------------------------------------------------------------

    def run(self, batches: Iterable[Any], progress: bool = True) -> CalibrationResult:
        """Stream every batch once; raise ``ValueError`` on empty data or non-finite values."""
        if batches is None:
            raise ValueError("argument 'batches' must be an iterable of inputs or (inputs, targets), got None")
        try:
            iterator: Iterator[Any] = iter(batches)
        except TypeError:
            raise TypeError(
                f"argument 'batches' must be an iterable of inputs or (inputs, targets), got {type(batches).__name__}"
            ) from None
        device = module_device(self.model)
        generator = torch.Generator(device=device)
        generator.manual_seed(self.seed)
        statistics: dict[str, LayerStatistics | None] = {name: None for name in self.layers}
        kept_inputs: list[torch.Tensor] = []
        kept_count = 0
        inputs_complete = True
        samples = 0
        batch_count = 0
        has_loss: bool | None = None
        total = len(batches) if hasattr(batches, "__len__") else None  # type: ignore[arg-type]
        was_training = {name: module.training for name, module in self.model.named_modules()}
        self.model.eval()  # dropout off and batch norm frozen: samples stay independent
        try:
            for batch in tqdm(iterator, total=total, desc="calibrate", disable=not progress, leave=False):
                inputs, targets = split_batch(batch)
                inputs = to_device(inputs, device)
                targets = to_device(targets, device)
                use_loss = self.loss_fn is not None and targets is not None
                if self.sensitivity == "loss" and targets is None:
                    raise ValueError(
                        f"argument 'batches': sensitivity='loss' needs (inputs, targets) batches, batch {batch_count} "
                        "has no targets"
                    )
                if has_loss is None:
                    has_loss = use_loss
                elif has_loss != use_loss:
                    raise ValueError(
                        f"argument 'batches': batch {batch_count} {'has' if use_loss else 'lacks'} targets "
                        "unlike the first batch; give targets for every batch or for none"
                    )
                batch_statistics = self._batch_statistics(inputs, targets if use_loss else None, generator, batch_count)
                for name, stats in batch_statistics.items():
                    statistics[name] = merge_statistics(statistics[name], stats)
                batch_samples = int(inputs.shape[0]) if isinstance(inputs, torch.Tensor) and inputs.dim() > 0 else 1
                samples += batch_samples
                batch_count += 1
                if self.keep_inputs and inputs_complete:
                    fits = kept_count + batch_samples <= MAX_STORED_SAMPLES
                    if isinstance(inputs, torch.Tensor) and fits:
                        kept_inputs.append(inputs.detach())
                        kept_count += batch_samples
                    else:  # too many samples to replay, or inputs that cannot be concatenated
                        inputs_complete = False
                        kept_inputs = []
        finally:
            for name, module in self.model.named_modules():
                module.train(was_training.get(name, module.training))
        if batch_count == 0:
            raise ValueError("argument 'batches': the calibration data is empty (expected at least one batch, got 0)")
        missing = [name for name, stats in statistics.items() if stats is None]
        if missing:
            raise ValueError(f"argument 'layers': layers {missing} never ran during the model's forward pass")
        logger.info("calibrated %d layers on %d samples in %d batches", len(statistics), samples, batch_count)
        return CalibrationResult(
            statistics={name: stats for name, stats in statistics.items() if stats is not None},
            samples=samples,
            batches=batch_count,
            inputs=torch.cat(kept_inputs) if inputs_complete and kept_inputs else None,
            inputs_complete=inputs_complete and bool(kept_inputs),
            has_loss=bool(has_loss),
        )

    # One batch -------------------------------------------------------------------------------------

    def _capture(self, inputs: Any) -> tuple[Any, dict[str, tuple[torch.Tensor, torch.Tensor]]]:
        """Forward pass with hooks: returns the model output and ``{layer: (input, output)}``."""
        captured: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        needs_graph = self.sensitivity != "local" or self.loss_fn is not None

        def make_hook(name: str) -> Callable[..., torch.Tensor | None]:
            def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor | None:
                if name in captured:
                    raise RuntimeError(
                        f"layer {name!r} ran twice in one forward pass; shared layers are not supported"
                    )
                if needs_graph and not output.requires_grad:
                    # Frozen parameters: make the output a leaf of the graph so dy/dz still exists.
                    output = output.detach().requires_grad_(True)
                    captured[name] = (args[0].detach(), output)
                    return output
                captured[name] = (args[0].detach(), output)
                return None

            return hook

        handles = [spec.module.register_forward_hook(make_hook(name)) for name, spec in self.layers.items()]
        try:
            with torch.set_grad_enabled(needs_graph):
                raw_output = self.model(inputs)
        finally:
            for handle in handles:
                handle.remove()
        return raw_output, captured

    def gradients(
        self,
        inputs: Any,
        targets: Any = None,
        generator: torch.Generator | None = None,
        batch_index: int = 0,
        check_finite: bool = True,
    ) -> dict[str, LayerGradients]:
        """One batch: every layer's inputs ``(N, in)``, sensitivity gradients ``(P, N, out)`` (None for
        ``sensitivity="local"``) and per-sample loss gradients ``(N, out)`` (None without targets).

        With ``check_finite`` raises ``ValueError`` when an input or gradient is NaN or Inf.
        """
        if generator is None:
            generator = torch.Generator(device=module_device(self.model))
            generator.manual_seed(self.seed)
        raw_output, captured = self._capture(inputs)
        output = self.output_fn(raw_output) if self.output_fn is not None else raw_output
        if not isinstance(output, torch.Tensor):
            raise TypeError(
                f"the model returned {type(output).__name__}, expected a tensor; pass output_fn to select it"
            )
        names = [name for name in self.layers if name in captured]
        if not names:
            return {}
        zs = [captured[name][1] for name in names]
        loss_grads: list[torch.Tensor] | None = None
        if targets is not None and self.loss_fn is not None:
            loss_grads = self._loss_gradients(output, targets, zs)
        if self.sensitivity == "output":
            sensitivity_grads: list[torch.Tensor | None] = list(self._output_gradients(output, zs, generator))
        elif self.sensitivity == "loss":
            if loss_grads is None:
                raise ValueError("sensitivity='loss' needs targets and loss_fn for every batch")
            sensitivity_grads = [g.unsqueeze(0) for g in loss_grads]
        else:
            sensitivity_grads = [None] * len(names)
        result = {}
        for index, name in enumerate(names):
            spec = self.layers[name]
            x = spec.inputs_2d(captured[name][0])
            g = None if sensitivity_grads[index] is None else spec.grads_3d(sensitivity_grads[index].detach())
            g_loss = None if loss_grads is None else spec.grads_3d(loss_grads[index].detach().unsqueeze(0))[0]
            result[name] = LayerGradients(x=x, g=g, loss_g=g_loss)
            if check_finite:
                _check_layer_gradients(result[name], name, batch_index)
        return result

    def _batch_statistics(
        self, inputs: Any, targets: Any, generator: torch.Generator, batch_index: int
    ) -> dict[str, LayerStatistics]:
        result = {}
        for name, grads in self.gradients(inputs, targets, generator, batch_index).items():
            x = grads.x
            g = x.new_ones(x.shape[0], self.layers[name].fan_out) if grads.g is None else grads.g.to(x.dtype)
            loss_grad_sum = None
            if grads.loss_g is not None:
                loss_grad_sum = grads.loss_g.T.to(x.dtype) @ x  # dL/dW of the summed per-sample loss
            stats = LayerStatistics(
                moments=fused_moments(x, g),
                activation_sq_sum=x.square().sum(dim=0),
                loss_grad_sum=loss_grad_sum,
                samples=int(x.shape[0]),
            )
            sums = [stats.moments.s0, stats.moments.mean, stats.moments.m2, stats.activation_sq_sum]
            if loss_grad_sum is not None:
                sums.append(loss_grad_sum)
            # Finite inputs can still overflow the float32 sums of huge activations.
            if not all(bool(torch.isfinite(t.sum(dtype=torch.float64))) for t in sums):
                raise ValueError(
                    f"calibration batch {batch_index}: the statistics of layer {name!r} overflowed to NaN or Inf "
                    "(expected finite sums; the activations or gradients are too large)"
                )
            result[name] = stats
        return result

    def _loss_gradients(self, output: torch.Tensor, targets: Any, zs: list[torch.Tensor]) -> list[torch.Tensor]:
        """Per-sample loss gradients ``d loss^s / dz`` (the batch loss rescaled to a per-sample sum)."""
        assert self.loss_fn is not None
        loss = self.loss_fn(output, targets)
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
        grads = torch.autograd.grad(total, zs, retain_graph=self.sensitivity == "output", allow_unused=True)
        return [torch.zeros_like(z) if g is None else g for g, z in zip(grads, zs)]

    def _output_gradients(
        self, output: torch.Tensor, zs: list[torch.Tensor], generator: torch.Generator
    ) -> list[torch.Tensor]:
        """``(P, *z.shape)`` per layer: exact Jacobian rows, or scaled Rademacher probes ``v^T J``."""
        batch = output.shape[0] if output.dim() > 1 else 1
        flat = output.reshape(batch, -1)
        outputs = flat.shape[1]
        probes = self.probes
        if probes is None and outputs > MAX_EXACT_OUTPUTS:
            probes = DEFAULT_PROBES
        if probes is None:
            # Row k of grad_outputs selects output k of every sample: g_k = dy_k/dz, per sample.
            basis = torch.eye(outputs, dtype=flat.dtype, device=flat.device)
            grad_outputs = basis.unsqueeze(1).expand(outputs, batch, outputs)
        else:
            signs = torch.randint(0, 2, (probes, batch, outputs), generator=generator, device=flat.device)
            # Scaled by 1/sqrt(P) so that sum_p g_p^2 is the unbiased estimate (1/P) sum_p (v_p^T J)^2.
            grad_outputs = (signs.to(flat.dtype) * 2 - 1) / probes**0.5
        grad_outputs = grad_outputs.reshape(grad_outputs.shape[0], *output.shape)
        try:
            grads = torch.autograd.grad(
                output, zs, grad_outputs=grad_outputs, is_grads_batched=True, retain_graph=True, allow_unused=True
            )
        except RuntimeError as error:
            # Some ops have no batching rule; fall back to one backward pass per row.
            logger.warning("batched backward failed (%s); falling back to one backward pass per row", error)
            rows = []
            for index in range(grad_outputs.shape[0]):
                rows.append(
                    torch.autograd.grad(
                        output, zs, grad_outputs=grad_outputs[index], retain_graph=True, allow_unused=True
                    )
                )
            grads = tuple(
                None if rows[0][k] is None else torch.stack([row[k] for row in rows]) for k in range(len(zs))
            )
        count = grad_outputs.shape[0]
        return [
            z.new_zeros((count, *z.shape)) if g is None else g for g, z in zip(grads, zs)
        ]
