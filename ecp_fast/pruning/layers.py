"""Which modules are pruned, and how each one's weight reads and writes as an ``(out, in)`` matrix.

Three kinds of layer are scored, each read as a linear map of its (unfolded) inputs (docs/method.md, "The ops"):

* ``"linear"``: :class:`torch.nn.Linear` (and subclasses), weight ``(out, in)``;
* ``"conv2d"``: :class:`torch.nn.Conv2d` with ``groups=1`` and zero padding, weight
  ``(out, C, kh, kw)`` viewed as ``(out, C kh kw)``;
* ``"conv1d"``: Hugging Face's ``transformers.pytorch_utils.Conv1D`` (GPT-2, GPT, ...), a Linear
  whose weight is stored transposed, ``(in, out)``. It is recognised by its class name and module,
  so ``transformers`` is never imported here.

Every consumer reads and writes weights through :class:`LayerSpec` (``weight_view``, ``zero_weights``, ``as_2d``,
``mask_to_weight_shape``) or :func:`weight_2d`, never through ``weight.view(out, in)``, which is
wrong for the transposed kind.

:func:`resolve_layers` chooses the layers. By default, as Wanda and SparseGPT do, it leaves out the
output head (``model.get_output_embeddings()``, or a module named ``lm_head``) and every layer whose
weight is tied to another parameter (shares its storage, as a tied language-model head shares the
input embedding): pruning such a weight through one module would silently change the other.
"""

from __future__ import annotations

import fnmatch
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from ecp_fast.pruning.masks import storage_key, weight_reparametrization

logger = logging.getLogger(__name__)

#: The layer kinds :class:`LayerSpec` knows.
KINDS = ("linear", "conv2d", "conv1d")
#: Names of output heads left out by default when the model has no ``get_output_embeddings``.
OUTPUT_HEAD_NAMES = ("lm_head",)


def is_transposed_linear(module: nn.Module) -> bool:
    """True for Hugging Face's ``Conv1D`` (weight stored ``(in, out)``), found without importing transformers."""
    return any(cls.__name__ == "Conv1D" and cls.__module__.startswith("transformers") for cls in type(module).__mro__)


def layer_kind(module: nn.Module) -> str | None:
    """``"linear"``, ``"conv2d"`` or ``"conv1d"`` for a layer type that can be scored, else None."""
    if isinstance(module, nn.Linear):
        return "linear"
    if isinstance(module, nn.Conv2d):
        return "conv2d"
    if is_transposed_linear(module):
        return "conv1d"
    return None


def weight_parameter(module: nn.Module) -> torch.Tensor:
    """The stored weight tensor: ``weight_orig`` under ``torch.nn.utils.prune``, else ``weight``.

    Its shape is the module's own (``(in, out)`` for ``Conv1D``); use :meth:`LayerSpec.weight_view`
    for the ``(out, in)`` view.
    """
    name = "weight_orig" if hasattr(module, "weight_orig") else "weight"
    weight = getattr(module, name)
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"{type(module).__name__}.{name} must be a tensor, got {type(weight).__name__}")
    return weight


def existing_mask(module: nn.Module) -> torch.Tensor | None:
    """The ``torch.nn.utils.prune`` mask of the weight (in the weight's own shape), or None."""
    return getattr(module, "weight_mask", None)


def _as_2d(module: nn.Module, tensor: torch.Tensor) -> torch.Tensor:
    if is_transposed_linear(module):
        return tensor.t()
    return tensor.reshape(tensor.shape[0], -1)


def weight_2d(module: nn.Module) -> torch.Tensor:
    """The effective weight (mask applied) as ``(out, in)``, detached.

    For a Linear or Conv2d it shares storage with the parameter when there is no mask; for a
    ``Conv1D`` it is a contiguous copy of the transposed weight.
    """
    weight = weight_parameter(module).detach()
    mask = existing_mask(module)
    if mask is not None:
        weight = weight * mask
    weight_2d_view = _as_2d(module, weight)
    return weight_2d_view.contiguous() if is_transposed_linear(module) else weight_2d_view


@dataclass(frozen=True)
class LayerSpec:
    """A scored layer: its qualified name, the module and its kind (one of :data:`KINDS`)."""

    name: str
    module: nn.Module
    kind: str

    @property
    def fan_out(self) -> int:
        """Output neurons (rows of the ``(out, in)`` weight view)."""
        weight = weight_parameter(self.module)
        return int(weight.shape[1] if self.kind == "conv1d" else weight.shape[0])

    @property
    def fan_in(self) -> int:
        """Inputs per neuron (columns of the ``(out, in)`` weight view; ``C kh kw`` for a conv)."""
        weight = weight_parameter(self.module)
        return int(weight.shape[0] if self.kind == "conv1d" else weight[0].numel())

    # ---- weights as (out, in) ----------------------------------------------------------------------

    def as_2d(self, tensor: torch.Tensor) -> torch.Tensor:
        """A tensor of the weight's stored shape (weight, mask, gradient) as ``(out, in)``.

        The result shares storage with ``tensor`` (a transpose for ``Conv1D``, a reshape of a
        contiguous tensor otherwise), so writing into it writes ``tensor``; a tensor with no such
        view (a ``channels_last`` convolution's) comes back as a copy (see :meth:`zero_weights`).
        """
        stored = weight_parameter(self.module)
        if tuple(tensor.shape) != tuple(stored.shape):
            raise ValueError(
                f"layer {self.name!r}: expected a tensor of the weight's shape {tuple(stored.shape)}, "
                f"got {tuple(tensor.shape)}"
            )
        if self.kind == "conv1d":
            return tensor.t()
        return tensor.reshape(self.fan_out, self.fan_in)

    def weight_view(self) -> torch.Tensor:
        """The stored weight parameter (``weight_orig`` when masked) as ``(out, in)``: a view that
        writes through, except for a weight in another memory format (see :meth:`as_2d`)."""
        return self.as_2d(weight_parameter(self.module))

    def zero_weights(self, removed: torch.Tensor) -> None:
        """Zero the stored weights (``weight_orig`` when masked) where the ``(out, in)`` bool
        ``removed`` is True, in place, in any memory format (call it under ``torch.no_grad()``)."""
        weight_parameter(self.module).masked_fill_(self.mask_to_weight_shape(removed), 0)

    def mask_to_weight_shape(self, mask_2d: torch.Tensor) -> torch.Tensor:
        """An ``(out, in)`` tensor (mask, scores) in the weight's stored shape, contiguous."""
        expected = (self.fan_out, self.fan_in)
        if tuple(mask_2d.shape) != expected:
            raise ValueError(
                f"layer {self.name!r}: expected an (out, in) tensor of shape {expected}, got {tuple(mask_2d.shape)}"
            )
        if self.kind == "conv1d":
            return mask_2d.t().contiguous()
        return mask_2d.reshape(weight_parameter(self.module).shape)

    def mask_2d(self) -> torch.Tensor | None:
        """The installed ``torch.nn.utils.prune`` mask as ``(out, in)``, or None."""
        mask = existing_mask(self.module)
        return None if mask is None else self.as_2d(mask)

    def weight_2d(self) -> torch.Tensor:
        """The effective weight (mask applied), ``(out, in)``, detached (see :func:`weight_2d`)."""
        return weight_2d(self.module)

    # ---- samples ----------------------------------------------------------------------------------

    def inputs_2d(self, x: torch.Tensor) -> torch.Tensor:
        """Layer input as ``(N, in)`` samples: tokens for a Linear, unfolded patches for a Conv2d."""
        if self.kind != "conv2d":
            return x.reshape(-1, x.shape[-1])
        conv = self.module
        if not isinstance(conv, nn.Conv2d):
            raise TypeError(f"layer {self.name!r}: kind 'conv2d' needs an nn.Conv2d, got {type(conv).__name__}")
        if x.dim() == 3:  # unbatched (C, H, W)
            x = x.unsqueeze(0)
        patches = F.unfold(
            x, kernel_size=conv.kernel_size, dilation=conv.dilation, padding=_conv_padding(conv), stride=conv.stride
        )  # (B, C kh kw, L), columns in the order of weight.reshape(out, -1)
        return patches.transpose(1, 2).reshape(-1, patches.shape[1])

    def grads_3d(self, g: torch.Tensor) -> torch.Tensor:
        """Gradients ``(P, *z.shape)`` as ``(P, N, out)``, samples ordered like :meth:`inputs_2d`."""
        if self.kind != "conv2d":
            return g.reshape(g.shape[0], -1, g.shape[-1])
        if g.dim() == 4:  # unbatched conv output (P, out, H, W)
            g = g.unsqueeze(1)
        # (P, B, out, H, W) -> (P, B, H, W, out): output positions in unfold's row-major order.
        return g.permute(0, 1, 3, 4, 2).reshape(g.shape[0], -1, g.shape[2])


def _same_padding_total(conv: nn.Conv2d) -> list[int]:
    """The total padding of ``padding='same'`` per spatial dimension."""
    return [d * (k - 1) for d, k in zip(conv.dilation, conv.kernel_size, strict=True)]


def _asymmetric_same(conv: nn.Conv2d) -> bool:
    """nn.Conv2d pads 'same' asymmetrically where the total padding is odd; unfold cannot."""
    return conv.padding == "same" and any(total % 2 for total in _same_padding_total(conv))


def _conv_padding(conv: nn.Conv2d) -> tuple[int, int]:
    padding = conv.padding
    if padding == "valid":
        return (0, 0)
    if padding == "same":
        total = _same_padding_total(conv)
        if _asymmetric_same(conv):  # unsupported_reason skips such a layer; a spec made by hand gets here
            raise ValueError(
                f"Conv2d padding='same' with kernel_size={conv.kernel_size} and dilation={conv.dilation} "
                "pads asymmetrically, which is not supported; use an explicit integer padding"
            )
        return (total[0] // 2, total[1] // 2)
    return tuple(padding)  # type: ignore[return-value]


def unsupported_reason(module: nn.Module) -> str | None:
    """None when ``module`` can be scored, else why not (for errors and the skipped-layer warning)."""
    kind = layer_kind(module)
    reparametrized = None if kind is None else weight_reparametrization(module)
    if reparametrized is not None:  # found without reading ``module.weight``: that read may run the parametrization
        return (
            f"{type(module).__name__} with a parametrized weight ({reparametrized}) is not supported "
            "(a mask would act on a computed tensor; remove the parametrization)"
        )
    bias_reason = None if kind is None else _bias_reason(module)
    if bias_reason is not None:
        return bias_reason
    if kind is not None and any(tensor.is_inference() for tensor in _own_tensors(module)):
        return (
            f"{type(module).__name__} holds inference tensors (made under torch.inference_mode()), which cannot be "
            "changed in place; build or load the model outside inference_mode (or clone its parameters)"
        )
    if kind in ("linear", "conv1d"):
        return None
    if kind == "conv2d":
        if module.groups != 1:
            return f"Conv2d with groups={module.groups} is not supported (expected groups=1)"
        if module.padding_mode != "zeros":
            return f"Conv2d with padding_mode={module.padding_mode!r} is not supported (expected 'zeros')"
        if isinstance(module, nn.Conv2d) and _asymmetric_same(module):
            return (
                f"Conv2d with padding='same', kernel_size={module.kernel_size} and dilation={module.dilation} pads "
                "asymmetrically, which is not supported (expected an explicit integer padding)"
            )
        return None
    return f"{type(module).__name__} is not supported (expected nn.Linear, nn.Conv2d or transformers' Conv1D)"


def _bias_reason(module: nn.Module) -> str | None:
    """Why the layer's bias cannot take a compensation, or None: a pruning mask or a parametrization
    recomputes it at every call, so what is written into it would be thrown away."""
    if hasattr(module, "bias_orig") and hasattr(module, "bias_mask"):
        return (
            f"{type(module).__name__} with a masked bias (torch.nn.utils.prune on 'bias') is not supported (its "
            "compensation is written into the bias, which the mask recomputes); make the bias mask permanent first "
            "with torch.nn.utils.prune.remove(module, 'bias')"
        )
    reparametrized = weight_reparametrization(module, "bias")
    if reparametrized is not None:
        return (
            f"{type(module).__name__} with a parametrized bias ({reparametrized}) is not supported (its compensation "
            "is written into the bias, a computed tensor; remove the parametrization)"
        )
    return None


def _own_tensors(module: nn.Module) -> list[torch.Tensor]:
    """The layer's weight and bias as stored (``weight_orig`` under a mask), those that are tensors."""
    names = ("weight_orig", "weight", "bias_orig", "bias")
    return [tensor for name in names if isinstance(tensor := getattr(module, name, None), torch.Tensor)]


def layer_input(name: str, args: tuple) -> torch.Tensor:
    """The input a layer was called with, as a forward hook sees it: its first positional argument.

    Raises ``ValueError`` naming the layer where there is none (the model's code called it with a
    keyword, ``layer(input=x)``, which a forward hook does not see).
    """
    if not args or not isinstance(args[0], torch.Tensor):
        raise ValueError(
            f"argument 'model': layer {name!r} was called without its input tensor as the first positional "
            f"argument (for instance layer(input=x)), so its inputs cannot be captured; call it as layer(x), or "
            f"leave it out (exclude=[{name!r}])"
        )
    return args[0]


# ---- which layers ---------------------------------------------------------------------------------


def output_heads(model: nn.Module) -> list[str]:
    """Names of the model's output heads.

    ``get_output_embeddings()`` when the model has it, and modules named ``lm_head``.
    """
    names: list[str] = []
    getter = getattr(model, "get_output_embeddings", None)
    if callable(getter):
        try:
            head = getter()
        except (NotImplementedError, AttributeError, TypeError):
            head = None
        if isinstance(head, nn.Module):
            names.extend(name for name, module in model.named_modules() if module is head)
    for name, _ in model.named_modules():
        if name.rpartition(".")[2] in OUTPUT_HEAD_NAMES and name not in names:
            names.append(name)
    return names


def tied_weights(model: nn.Module, names: Sequence[str] | None = None) -> dict[str, list[str]]:
    """``{layer: [other parameters]}`` for layers whose stored weight or bias is tied to another parameter.

    Tied means the same tensor under another name, or a tensor sharing its storage (e.g. a language
    model's head and its input embedding; two layers given one bias). ``names`` restricts the layers
    checked (default: every module with a ``weight``). A bias counts too: pruning writes each layer's
    compensation into it, which would change the other holder as well.
    """
    holders: dict[object, list[str]] = {}
    for parameter_name, parameter in model.named_parameters(remove_duplicate=False):
        holders.setdefault(storage_key(parameter), []).append(parameter_name)
    modules = dict(model.named_modules())
    result: dict[str, list[str]] = {}
    for name in modules if names is None else names:
        module = modules[name]
        if not isinstance(getattr(module, "weight_orig", getattr(module, "weight", None)), torch.Tensor):
            continue
        prefix = f"{name}." if name else ""
        own = {prefix + attribute for attribute in ("weight", "weight_orig", "bias", "bias_orig")}
        tensors = [weight_parameter(module)]
        bias = getattr(module, "bias_orig", getattr(module, "bias", None))
        if isinstance(bias, nn.Parameter):
            tensors.append(bias)
        others = [other for tensor in tensors for other in holders.get(storage_key(tensor), []) if other not in own]
        # Parameters of the same module reached through an alias path are the same tie.
        if others:
            result[name] = list(dict.fromkeys(others))
    return result


def _matches(name: str, patterns: Sequence[str]) -> str | None:
    """The first pattern that matches ``name`` or one of its parent modules (``a.b`` matches ``a.b.c``)."""
    parts = name.split(".")
    prefixes = [".".join(parts[: index + 1]) for index in range(len(parts))]
    for pattern in patterns:
        if any(fnmatch.fnmatchcase(prefix, pattern) for prefix in prefixes):
            return pattern
    return None


def _check_patterns(exclude: Sequence[str] | None) -> list[str]:
    if exclude is None:
        return []
    if isinstance(exclude, str):
        return [exclude]
    if not isinstance(exclude, Iterable):
        raise TypeError(f"argument 'exclude' must be a layer name, a glob pattern or a list of them, got {exclude!r}")
    patterns = list(exclude)
    for pattern in patterns:
        if not isinstance(pattern, str):
            raise TypeError(
                f"argument 'exclude' must hold layer names or glob patterns (str), got {type(pattern).__name__}"
            )
    return patterns


def _weight_bearing_skips(model: nn.Module, candidates: set[str]) -> dict[str, str]:
    """Modules with a weight matrix (a parameter of 2+ dimensions) that cannot be scored, and why."""
    skipped: dict[str, str] = {}
    for name, module in model.named_modules():
        if name in candidates or isinstance(module, (nn.Embedding, nn.EmbeddingBag, parametrize.ParametrizationList)):
            continue  # a parametrization's own tensors are its layer's, which is listed
        if layer_kind(module) is not None:
            reason = unsupported_reason(module)
            if reason is not None:
                skipped[name] = reason
            continue
        matrices = [pname for pname, p in module.named_parameters(recurse=False) if p.dim() >= 2]
        if matrices:
            skipped[name] = f"{type(module).__name__} is not supported (parameters {', '.join(matrices)})"
    return skipped


def resolve_layers(
    model: nn.Module,
    layers: Sequence[str] | None = None,
    exclude: Sequence[str] | str | None = None,
    *,
    include_output_head: bool = False,
) -> dict[str, LayerSpec]:
    """The layers to score, in module order.

    Args:
        model: the network.
        layers: names of the layers to score; None takes every ``nn.Linear``, supported
            ``nn.Conv2d`` and transformers ``Conv1D``, except the defaults below.
        exclude: names or glob patterns (``fnmatch``, e.g. ``"lm_head"``, ``"*.mlp.*"``) of modules
            to leave out; a pattern matching a module leaves out everything inside it.
        include_output_head: with ``layers=None``, also score the output head (left out by
            default, as Wanda and SparseGPT do).

    With ``layers=None`` these are left out: the output head (``model.get_output_embeddings()`` or
    a module named ``lm_head``) unless ``include_output_head``, every layer whose weight is tied to
    another parameter (it would be changed through the other module too; never scored), and the
    modules ``exclude`` matches. One warning lists the modules with a weight matrix that cannot be
    scored (embeddings are not layers and are left out silently).

    Raises:
        ValueError: a named layer does not exist, cannot be scored, or is tied to another
            parameter; or nothing is left to score.
    """
    patterns = _check_patterns(exclude)
    modules = dict(model.named_modules())
    if layers is None:
        return _default_layers(model, modules, patterns, include_output_head)
    return _named_layers(model, modules, layers, patterns)


def _layer_spec(name: str, module: nn.Module) -> LayerSpec:
    """The spec of a layer that :func:`unsupported_reason` accepts."""
    kind = layer_kind(module)
    assert kind is not None  # unsupported_reason(module) is None
    return LayerSpec(name, module, kind)


def _default_layers(
    model: nn.Module, modules: dict[str, nn.Module], patterns: list[str], include_output_head: bool
) -> dict[str, LayerSpec]:
    """:func:`resolve_layers` with ``layers=None``: every layer that can be scored, but the defaults left out."""
    # nn.MultiheadAttention reads its out_proj's weight directly and never calls it: no hook would fire.
    inside_attention = {
        f"{name}.{child}" if name else child
        for name, module in modules.items()
        if isinstance(module, nn.MultiheadAttention)
        for child, _ in module.named_children()
    }
    candidates = [
        name
        for name, module in modules.items()
        if layer_kind(module) is not None and unsupported_reason(module) is None and name not in inside_attention
    ]
    skipped = _weight_bearing_skips(model, set(candidates) | inside_attention)
    if skipped:
        logger.warning(
            "not pruning %d module(s) with weight matrices that cannot be scored: %s",
            len(skipped),
            "; ".join(f"{name!r}: {reason}" for name, reason in skipped.items()),
        )
    heads = set() if include_output_head else set(output_heads(model))
    tied = tied_weights(model, candidates)
    specs: dict[str, LayerSpec] = {}
    left_out: list[str] = []
    used_patterns: set[str] = set()
    for name in candidates:
        pattern = _matches(name, patterns)
        if pattern is not None:
            used_patterns.add(pattern)
            left_out.append(f"{name!r} (exclude pattern {pattern!r})")
        elif name in tied:
            left_out.append(f"{name!r} (tied to {', '.join(tied[name])})")
        elif name in heads:
            left_out.append(f"{name!r} (output head; include_output_head=True scores it)")
        else:
            specs[name] = _layer_spec(name, modules[name])
    _warn_unused_patterns(patterns, used_patterns, modules)
    if left_out:
        logger.info("left out of pruning: %s", "; ".join(left_out))
    if not specs:
        left_out += [f"{name!r} ({reason})" for name, reason in skipped.items()]
        raise ValueError(
            "argument 'layers': the model has no nn.Linear, supported nn.Conv2d or Conv1D layer to prune"
            + (f" (left out: {'; '.join(left_out)})" if left_out else "")
        )
    return specs


def _named_layers(
    model: nn.Module, modules: dict[str, nn.Module], layers: Sequence[str], patterns: list[str]
) -> dict[str, LayerSpec]:
    """:func:`resolve_layers` with the layers named: each must exist, be scorable and not be tied."""
    if isinstance(layers, str):
        raise TypeError(f"argument 'layers' must be a sequence of layer names, got the string {layers!r}")
    if not isinstance(layers, Iterable):
        raise TypeError(f"argument 'layers' must be a sequence of layer names, got {layers!r}")
    names = list(layers)
    if not names:
        raise ValueError("argument 'layers' must name at least one layer, got an empty sequence")
    specs = {}
    for name in names:
        if name not in modules or name == "":
            prunable = [n for n, m in modules.items() if n and layer_kind(m) is not None]
            raise ValueError(
                f"argument 'layers': no module named {name!r} in the model; prunable layers are {prunable}"
            )
        module = modules[name]
        reason = unsupported_reason(module)
        if reason is not None:
            raise ValueError(f"argument 'layers': layer {name!r} cannot be pruned: {reason}")
        tied = tied_weights(model, [name])
        if name in tied:
            raise ValueError(
                f"argument 'layers': layer {name!r} has its weight or bias tied to {', '.join(tied[name])}; pruning it "
                "would change those too. Leave it out, or untie it first (e.g. clone the weight into a new "
                "nn.Parameter and set config.tie_word_embeddings=False)"
            )
        if _matches(name, patterns) is not None:
            continue
        specs[name] = _layer_spec(name, module)
    if not specs:
        raise ValueError(f"argument 'exclude': patterns {patterns} leave none of the layers {names}")
    return specs


def _warn_unused_patterns(patterns: Sequence[str], used: set[str], modules: dict[str, nn.Module]) -> None:
    for pattern in patterns:
        if pattern in used:
            continue
        if not any(_matches(name, [pattern]) for name in modules if name):
            logger.warning("argument 'exclude': pattern %r matches no module of the model", pattern)
