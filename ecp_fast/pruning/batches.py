"""Calibration batches: what a batch holds, how the model is called on it, where it lives.

A batch is ``inputs`` or ``(inputs, targets)``. ``inputs`` is

* a tensor, passed as ``model(inputs)``;
* a mapping (a ``dict``, or what a Hugging Face tokenizer returns), passed as ``model(**inputs)``;
  an ``attention_mask`` key (``(batch, tokens)``, 1 for real tokens, 0 for padding) makes padding
  tokens count for nothing in the statistics (:func:`sample_weights`);
* a :class:`BlockInputs`, the captured positional and keyword arguments of one block of a model
  (:func:`capture_block_inputs`), passed as ``block(hidden, *args, **kwargs)``.

Hugging Face models (a ``config`` with ``use_cache``) are called with ``use_cache=False``: a
key/value cache is never needed for calibration and would hold every layer's keys and values.

A model that fails on a calibration batch raises a ``ValueError`` naming argument ``batches``, the
batch, its inputs and what to check, chained to the model's own error (:func:`model_errors`).
"""

from __future__ import annotations

import contextlib
import inspect
import logging
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

logger = logging.getLogger(__name__)


# ---- one block's captured arguments ----------------------------------------------------------------


@dataclass
class BlockInputs:
    """What one block of a model receives for one batch: ``block(hidden, *args, **kwargs)``.

    Attributes:
        hidden: the hidden states, the block's first argument (``(batch, tokens, d)`` in a transformer).
        args: the remaining positional arguments.
        kwargs: the keyword arguments (attention mask, position embeddings or ids, ``use_cache=False``).
        token_weights: ``(batch * tokens,)`` 0/1 weights of the tokens (0 for padding), or None when
            every token counts.
        per_block: ``(args, kwargs)`` of every block, where the blocks do not all take the first
            block's (layers of different types: sliding-window and full attention with their own masks
            or rotary embeddings, a position bias that the first block computes and hands on); None
            when they do. :meth:`for_block` picks a block's.
    """

    hidden: torch.Tensor
    args: tuple = ()
    kwargs: dict[str, Any] = field(default_factory=dict)
    token_weights: torch.Tensor | None = None
    per_block: tuple[tuple[tuple, dict[str, Any]], ...] | None = None

    def __call__(self, block: nn.Module) -> torch.Tensor:
        """The block's output hidden states (the first element when it returns a tuple)."""
        return block_output(block(self.hidden, *self.args, **self.kwargs))

    def with_hidden(self, hidden: torch.Tensor) -> BlockInputs:
        """The same arguments with new hidden states (the previous block's output)."""
        return replace(self, hidden=hidden)

    def for_block(self, index: int) -> BlockInputs:
        """The inputs of block ``index``: its own arguments where :attr:`per_block` has them."""
        if self.per_block is None or not 0 <= index < len(self.per_block):
            return self
        args, kwargs = self.per_block[index]
        return replace(self, args=args, kwargs=kwargs)

    def to(self, device: torch.device | str | None) -> BlockInputs:
        """Every tensor (also inside ``args``, ``kwargs`` and :attr:`per_block`) on ``device``, a tensor
        that several of them share moved once; None leaves them where they are."""
        if device is None:
            return self
        device = torch.device(device)
        moved: dict[int, torch.Tensor] = {}
        return BlockInputs(
            hidden=self.hidden.to(device),
            args=to_device(self.args, device, moved),
            kwargs=to_device(self.kwargs, device, moved),
            token_weights=None if self.token_weights is None else self.token_weights.to(device),
            per_block=None if self.per_block is None else to_device(self.per_block, device, moved),
        )

    @property
    def nbytes(self) -> int:
        """Bytes held by the hidden states (the other arguments are usually shared or small)."""
        return self.hidden.numel() * self.hidden.element_size()


def block_output(output: Any) -> torch.Tensor:
    """A block's hidden states: the output itself, or the first element of a tuple or list."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise TypeError(
        f"a block must return a tensor or a tuple whose first element is a tensor, got {type(output).__name__}"
    )


# ---- batches -------------------------------------------------------------------------------------------


def split_batch(batch: Any) -> tuple[Any, Any]:
    """``inputs`` or ``(inputs, targets)`` (tuple, list) -> ``(inputs, targets or None)``.

    A mapping or :class:`BlockInputs` is inputs alone; ``(mapping, targets)`` is a pair.
    """
    if isinstance(batch, (tuple, list)):
        if len(batch) == 1:
            return batch[0], None
        if len(batch) == 2:
            return batch[0], batch[1]
        raise ValueError(
            f"argument 'batches': each batch must be inputs or (inputs, targets), got a sequence of {len(batch)} items"
        )
    return batch, None


def to_device(value: Any, device: torch.device, moved: dict[int, torch.Tensor] | None = None) -> Any:
    """``value`` on ``device``: tensors moved, mappings, tuples, lists and :class:`BlockInputs` moved
    item by item (a mapping becomes a ``dict``); anything else unchanged. With ``moved`` (``{id: moved
    tensor}``, filled as it goes) a tensor met again is moved once: what was shared stays shared."""
    if isinstance(value, torch.Tensor):
        if moved is None:
            return value.to(device)
        if id(value) not in moved:
            moved[id(value)] = value.to(device)
        return moved[id(value)]
    if isinstance(value, BlockInputs):
        return value.to(device)
    if isinstance(value, Mapping):
        return {key: to_device(item, device, moved) for key, item in value.items()}
    if isinstance(value, tuple) and not hasattr(value, "_fields"):
        return tuple(to_device(item, device, moved) for item in value)
    if isinstance(value, list):
        return [to_device(item, device, moved) for item in value]
    return value


def detach(value: Any, detached: dict[int, torch.Tensor] | None = None) -> Any:
    """``value`` with every tensor detached (through mappings, tuples, lists and :class:`BlockInputs`);
    with ``detached`` (``{id: detached tensor}``) a tensor met again gives the same detached tensor."""
    if isinstance(value, torch.Tensor):
        if detached is None:
            return value.detach()
        return detached.setdefault(id(value), value.detach())
    if isinstance(value, BlockInputs):
        return replace(
            value,
            hidden=detach(value.hidden),
            args=detach(value.args, detached),
            kwargs=detach(value.kwargs, detached),
            per_block=None if value.per_block is None else detach(value.per_block, detached),
        )
    if isinstance(value, Mapping):
        return {key: detach(item, detached) for key, item in value.items()}
    if isinstance(value, tuple) and not hasattr(value, "_fields"):
        return tuple(detach(item, detached) for item in value)
    if isinstance(value, list):
        return [detach(item, detached) for item in value]
    return value


def storage_address(tensor: torch.Tensor) -> int | None:
    """The address of a strided tensor's storage (views share it); None for other layouts (sparse)."""
    return tensor.untyped_storage().data_ptr() if tensor.layout == torch.strided else None


def storages(value: Any) -> set[int]:
    """Addresses of the storages of every strided tensor in ``value`` (through mappings, tuples, lists
    and :class:`BlockInputs`): a tensor whose storage is among them holds no memory of its own."""
    if isinstance(value, torch.Tensor):
        address = storage_address(value)
        return set() if address is None else {address}
    if isinstance(value, BlockInputs):
        return storages([value.hidden, value.args, value.kwargs])
    items = value.values() if isinstance(value, Mapping) else value if isinstance(value, (tuple, list)) else ()
    return set().union(*(storages(item) for item in items))


def eval_mode(model: nn.Module) -> contextlib.AbstractContextManager[nn.Module]:
    """``model`` in eval mode (dropout off, batch norm frozen) for the block; every submodule's own
    mode is restored after, so a model that mixes modes gets exactly its modes back."""
    return _in_mode(model, training=False)


def train_mode(model: nn.Module) -> contextlib.AbstractContextManager[nn.Module]:
    """``model`` in training mode for the block; every submodule's own mode is restored after."""
    return _in_mode(model, training=True)


@contextlib.contextmanager
def _in_mode(model: nn.Module, training: bool) -> Iterator[nn.Module]:
    modes = [(module, module.training) for module in model.modules()]
    model.train(training)
    try:
        yield model
    finally:
        _restore_modes(modes)


def _restore_modes(modes: list[tuple[nn.Module, bool]]) -> None:
    for module, training in modes:  # parents first: a parent's train() reaches its children again
        module.train(training)
    for module, training in modes:  # a child shared by two parents was reached again after its own turn
        module.training = training


def module_device(module: nn.Module) -> torch.device:
    """Where a module computes: the device of its first parameter (or buffer); CPU for an empty one."""
    for tensor in module.parameters():
        return tensor.device
    for buffer in module.buffers():
        return buffer.device
    return torch.device("cpu")


def _takes_use_cache(model: nn.Module) -> bool:
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "use_cache"):
        return False
    try:
        return "use_cache" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


def call_model(model: nn.Module, inputs: Any) -> Any:
    """Run ``model`` on one batch's inputs: ``model(**inputs)`` for a mapping,
    ``block(hidden, *args, **kwargs)`` for :class:`BlockInputs`, ``model(inputs)`` otherwise.

    Hugging Face models get ``use_cache=False`` unless the mapping sets it.
    """
    if isinstance(inputs, BlockInputs):
        return model(inputs.hidden, *inputs.args, **inputs.kwargs)
    extra = {"use_cache": False} if _takes_use_cache(model) else {}
    if isinstance(inputs, Mapping):
        kwargs = dict(inputs)
        if "use_cache" in kwargs:
            extra = {}
        return model(**kwargs, **extra)
    return model(inputs, **extra)


# ---- errors while running the model on a batch ---------------------------------------------------------

#: How a batch is laid out, said by every error a calibration batch causes in the model.
BATCHES_HINT = (
    "batches is an iterable of batches, each (inputs, targets) or inputs alone, so a single batch goes in a "
    "list: [(inputs, targets)]"
)
_MESSAGE_CHARS = 400  # the original message, cut: the whole of it stays in the chained error


def describe(value: Any) -> str:
    """A short description of a batch's inputs, targets or outputs, for error messages."""
    if isinstance(value, torch.Tensor):
        return f"a tensor of shape {tuple(value.shape)}, {value.dtype}"
    if isinstance(value, BlockInputs):
        return f"block inputs with hidden states of shape {tuple(value.hidden.shape)}"
    if isinstance(value, Mapping):
        return f"a mapping with keys {list(value)}"
    if isinstance(value, (tuple, list)):
        return f"a {type(value).__name__} of {len(value)} items"
    return f"a {type(value).__name__}"


def inputs_hint(model: nn.Module, inputs: Any) -> str:
    """What to check when ``model`` failed on ``inputs``: how several inputs are passed for a tuple or
    list (given to the model as one argument), how batches are laid out otherwise."""
    if not isinstance(inputs, (tuple, list)):
        return f"check the batch against the model ({BATCHES_HINT})"
    names = [f"x{index}" for index in range(len(inputs))]
    try:
        parameters = inspect.signature(model.forward).parameters.values()
        named = [p.name for p in parameters if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        if len(named) >= len(inputs):
            names = named[: len(inputs)]
    except (TypeError, ValueError):  # a forward without a signature: generic names
        pass
    example = "{" + ", ".join(f"{name!r}: {name}" for name in names) + "}"
    return (
        f"inputs that are a {type(inputs).__name__} are passed to the model as one argument, model(inputs); "
        f"pass several inputs as a mapping of keyword arguments, such as {example}, called as model(**inputs)"
    )


def passes_through(error: BaseException) -> bool:
    """Whether an error while running a batch is re-raised as it is: memory exhaustion (callers catch
    it to retry with smaller batches) and the library's own errors that already name their argument."""
    return isinstance(error, (MemoryError, torch.OutOfMemoryError)) or str(error).startswith("argument '")


def batch_error(what: str, index: int, details: str, error: Exception, hint: str) -> ValueError:
    """``ValueError("argument 'batches': {what} on batch {index} ({details}) raised ...; {hint}")`` for
    ``error``, which the caller chains (``raise batch_error(...) from error``)."""
    message = str(error).strip().rstrip(".")  # a full stop would end the sentence before the hint
    if len(message) > _MESSAGE_CHARS:
        message = message[:_MESSAGE_CHARS] + "..."
    return ValueError(
        f"argument 'batches': {what} on batch {index} ({details}) raised {type(error).__name__}: {message}; {hint}"
    )


@contextlib.contextmanager
def model_errors(
    model: nn.Module, inputs: Any, index: int, *, own: Callable[[Exception], bool] | None = None, note: str = ""
) -> Iterator[None]:
    """Run the model on batch ``index`` inside the block: an ``Exception`` it raises becomes a
    ``ValueError`` that names argument ``batches``, the batch, its inputs and what to check, chained
    to the original.

    ``KeyboardInterrupt`` and other ``BaseException`` pass through, as do the errors of
    :func:`passes_through`, those ``own`` recognises (the caller's hooks raise their own, clear
    errors) and those on :class:`BlockInputs` (a block of the model failing on the hidden states
    the library fed it, which no batch of the user's explains). A ``note`` (what the caller knows of
    the whole of ``batches``) replaces the hint on tensor and mapping inputs.
    """
    try:
        yield
    except Exception as error:
        if passes_through(error) or (own is not None and own(error)) or isinstance(inputs, BlockInputs):
            raise
        hint = note if note and not isinstance(inputs, (tuple, list)) else inputs_hint(model, inputs)
        raise batch_error("running the model", index, f"inputs: {describe(inputs)}", error, hint) from error


def model_output(raw_output: Any) -> torch.Tensor:
    """The output tensor ``y`` of what a model returned (the default ``output_fn``).

    A tensor is itself; an object or mapping with ``logits`` (a Hugging Face ``ModelOutput``) gives
    the logits; a tuple or list gives its first tensor; another mapping its first tensor value.
    """
    if isinstance(raw_output, torch.Tensor):
        return raw_output
    logits = raw_output.get("logits") if isinstance(raw_output, Mapping) else getattr(raw_output, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    values: Iterable[Any] = ()
    if isinstance(raw_output, Mapping):
        values = raw_output.values()
    elif isinstance(raw_output, (tuple, list)):
        values = raw_output
    for value in values:
        if isinstance(value, torch.Tensor):
            return value
    raise TypeError(
        f"the model returned {type(raw_output).__name__} without a tensor, logits or a first tensor element; "
        "pass output_fn to select the output tensor"
    )


def sample_weights(inputs: Any) -> torch.Tensor | None:
    """Per-token weights ``(batch * tokens,)`` (1.0 for real tokens, 0.0 for padding), flattened in the
    order a Linear layer's inputs ``(batch, tokens, in)`` flatten to samples; None when every sample
    counts (no ``attention_mask`` in a mapping, no ``token_weights`` in :class:`BlockInputs`).
    """
    if isinstance(inputs, BlockInputs):
        return inputs.token_weights
    if not isinstance(inputs, Mapping):
        return None
    mask = inputs.get("attention_mask")
    if mask is None:
        return None
    if not isinstance(mask, torch.Tensor) or mask.dim() != 2:
        raise ValueError(
            "argument 'batches': 'attention_mask' must be a (batch, tokens) tensor of 0 (padding) and 1 (token), "
            f"got {type(mask).__name__} of shape {tuple(getattr(mask, 'shape', ()))}"
        )
    return (mask.reshape(-1) != 0).to(torch.float32)


def count_samples(inputs: Any) -> int:
    """Samples in one batch's inputs, as reports count them.

    With an attention mask (or :class:`BlockInputs` token weights), the real (non-padding) tokens;
    a mapping with ``input_ids`` counts every token; :class:`BlockInputs` counts the positions of its
    hidden states; a tensor counts its first dimension (one sample per row).
    """
    weights = sample_weights(inputs)
    if weights is not None:
        return int(weights.count_nonzero())
    if isinstance(inputs, BlockInputs):
        return int(inputs.hidden.shape[:-1].numel()) if inputs.hidden.dim() > 1 else 1
    if isinstance(inputs, Mapping):
        ids = inputs.get("input_ids")
        if isinstance(ids, torch.Tensor):
            return int(ids.numel())
        for value in inputs.values():
            if isinstance(value, torch.Tensor):
                return int(value.shape[0]) if value.dim() > 0 else 1
        return 1
    if isinstance(inputs, torch.Tensor):
        return int(inputs.shape[0]) if inputs.dim() > 0 else 1
    return 1


def batch_rows(inputs: Any, targets: Any = None) -> int | None:
    """How many samples a batch holds along its first dimension, when it can be split there; else None.

    Tensors and mappings of tensors (their ``input_ids``, or their first tensor) can be split, with
    targets that are None or a tensor of as many rows. :class:`BlockInputs` and other inputs cannot:
    their arguments need not be batch-major.
    """
    rows: int | None = None
    if isinstance(inputs, torch.Tensor):
        rows = int(inputs.shape[0]) if inputs.dim() > 0 else None
    elif isinstance(inputs, Mapping):
        tensors = [inputs["input_ids"]] if isinstance(inputs.get("input_ids"), torch.Tensor) else []
        tensors += [value for value in inputs.values() if isinstance(value, torch.Tensor)]
        rows = int(tensors[0].shape[0]) if tensors and tensors[0].dim() > 0 else None
    if rows is None or not (targets is None or (isinstance(targets, torch.Tensor) and targets.dim() > 0)):
        return None
    return rows if targets is None or targets.shape[0] == rows else None


def slice_rows(value: Any, start: int, stop: int, rows: int) -> Any:
    """Samples ``start:stop`` of a batch split by :func:`batch_rows`: every tensor whose first dimension
    is ``rows`` is sliced there (inside a mapping too); anything else is passed as it is."""
    if isinstance(value, torch.Tensor):
        return value[start:stop] if value.dim() > 0 and value.shape[0] == rows else value
    if isinstance(value, Mapping):
        return {key: slice_rows(item, start, stop, rows) for key, item in value.items()}
    return value


# ---- block-by-block capture ---------------------------------------------------------------------------------


class _StopForward(Exception):
    """Raised by the capture hook to end the model's forward pass at the first block."""


def _blocks_to_capture(blocks: Sequence[nn.Module] | nn.Module) -> list[nn.Module]:
    """The blocks in execution order (a lone module: the first block alone, whose inputs alone are captured)."""
    if isinstance(blocks, nn.Module) and not isinstance(blocks, (nn.ModuleList, nn.Sequential)):
        block_list = [blocks]
    else:
        block_list = list(blocks)
        if not block_list:
            raise ValueError("argument 'blocks' must hold at least one block, got an empty sequence")
    if not isinstance(block_list[0], nn.Module):
        raise TypeError(f"argument 'blocks': the first block must be an nn.Module, got {type(block_list[0]).__name__}")
    return block_list


def _is_cache(value: Any) -> bool:
    """A key/value cache object (``transformers``' ``DynamicCache`` and kin): replayed calls must not
    share one, which every call would extend."""
    return not isinstance(value, torch.Tensor) and type(value).__name__.endswith("Cache")


def _split_arguments(args: tuple, kwargs: dict[str, Any]) -> tuple[Any, tuple, dict[str, Any]]:
    """A block call's hidden states and the rest of its arguments, with the cache off and no cache object."""
    kwargs = {key: None if _is_cache(value) else value for key, value in kwargs.items()}
    if "use_cache" in kwargs:
        kwargs["use_cache"] = False
    if args:
        return args[0], tuple(args[1:]), kwargs
    if "hidden_states" in kwargs:
        return kwargs.pop("hidden_states"), (), kwargs
    raise ValueError(
        "a block was called without positional arguments or 'hidden_states'; cannot tell which argument "
        f"is the hidden state (keywords: {sorted(kwargs)})"
    )


def _same_argument(first: Any, second: Any) -> bool:
    """Whether two arguments are the same object or equal (tensors element by element)."""
    if first is second:
        return True
    if isinstance(first, torch.Tensor) or isinstance(second, torch.Tensor):
        return (
            isinstance(first, torch.Tensor)
            and isinstance(second, torch.Tensor)
            and first.shape == second.shape
            and first.dtype == second.dtype
            and first.device == second.device
            and bool(torch.equal(first, second))
        )
    if isinstance(first, (tuple, list)) and isinstance(second, (tuple, list)):
        return type(first) is type(second) and len(first) == len(second) and all(map(_same_argument, first, second))
    if isinstance(first, Mapping) and isinstance(second, Mapping):
        return first.keys() == second.keys() and all(_same_argument(first[key], second[key]) for key in first)
    try:
        return bool(first == second)
    except Exception:  # noqa: BLE001 - an object without a usable ==: not known to be the same
        return False


def _per_block(
    recorded: dict[int, tuple[tuple, dict[str, Any]]], count: int, first: tuple[tuple, dict[str, Any]]
) -> tuple[tuple[tuple, dict[str, Any]], ...] | None:
    """Every block's arguments beside its hidden states, or None when each block takes the first's (a
    block the forward pass did not reach takes the first block's)."""
    arguments = [first]
    for index in range(1, count):
        call = recorded.get(index)
        arguments.append(first if call is None else _split_arguments(*call)[1:])
    if all(_same_argument(each, first) for each in arguments[1:]):
        return None
    return tuple(arguments)


def _capture_one(
    model: nn.Module, inputs: Any, recorded: dict[int, tuple[tuple, dict[str, Any]]], index: int, count: int
) -> BlockInputs:
    """Run ``model`` on one batch until the hooks that fill ``recorded`` stop it (at ``recorded.stop``);
    the first block's inputs, with every block's own arguments where they differ."""
    recorded.clear()
    # The hook's _StopForward is caught inside, so only the model's own failures are reworded.
    with torch.no_grad(), model_errors(model, inputs, index):
        try:
            call_model(model, inputs)
        except _StopForward:
            pass
    if 0 not in recorded:
        raise ValueError(f"argument 'blocks': the first block never ran in the model's forward pass (batch {index})")
    hidden, rest, kwargs = _split_arguments(*recorded[0])
    if not isinstance(hidden, torch.Tensor):
        raise TypeError(f"the first block's hidden states must be a tensor, got {type(hidden).__name__}")
    per_block = _per_block(recorded, count, (rest, kwargs))
    weights = sample_weights(inputs)
    shared: dict[int, torch.Tensor] = {}  # a tensor several blocks take stays one tensor
    entry = BlockInputs(detach(hidden), detach(rest, shared), detach(kwargs, shared), weights)
    entry = replace(entry, per_block=None if per_block is None else detach(per_block, shared))
    if weights is not None and weights.numel() != entry.hidden.shape[:-1].numel():
        raise ValueError(
            f"argument 'batches': batch {index}: the attention mask has {weights.numel()} tokens but the first "
            f"block's hidden states have shape {tuple(entry.hidden.shape)}"
        )
    return entry


def _tokens(args: tuple, kwargs: dict[str, Any]) -> int | None:
    """The positions of a block call's hidden states (``(batch, tokens, d)``: tokens), or None."""
    hidden = args[0] if args else kwargs.get("hidden_states")
    return int(hidden.shape[-2]) if isinstance(hidden, torch.Tensor) and hidden.dim() >= 2 else None


class _Recorder(dict):
    """``{position: (args, kwargs)}`` of each block's call in this forward pass. The pass stops at the
    last block, or at the first where :attr:`alike_up_to` says the blocks take the first block's
    arguments: batches of at most that many tokens were captured to the last block and every block
    took the first's (a sliding-window layer's mask differs from a full one only beyond its window)."""

    def __init__(self, last: int) -> None:
        super().__init__()
        self.last = last
        self.alike_up_to: int | None = None  # None: nothing is known to be alike

    def stops_at(self, position: int, args: tuple, kwargs: dict[str, Any]) -> bool:
        if position == self.last:
            return True
        tokens = _tokens(args, kwargs)
        return position == 0 and tokens is not None and self.alike_up_to is not None and tokens <= self.alike_up_to


@contextlib.contextmanager
def _recording(block_list: list[nn.Module]) -> Iterator[_Recorder]:
    """Pre-hooks that record each block's call and stop the forward pass (:meth:`_Recorder.stops_at`);
    removed after. A module listed at several positions records them in the order it is called."""
    recorded = _Recorder(last=len(block_list) - 1)
    positions: dict[int, list[int]] = {}
    for position, block in enumerate(block_list):
        positions.setdefault(id(block), []).append(position)

    def hook(module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        waiting = [position for position in positions[id(module)] if position not in recorded]
        if not waiting:
            return  # called again beyond its positions in the list
        recorded[waiting[0]] = (args, kwargs)
        if recorded.stops_at(waiting[0], args, kwargs):
            raise _StopForward  # nothing after these inputs is needed

    # first among the blocks' pre-hooks: the arguments as the block is called with them (its own
    # pre-hooks run again when the block is replayed), and the stop before anything else runs
    distinct = {id(block): block for block in block_list}.values()
    handles = [block.register_forward_pre_hook(hook, with_kwargs=True, prepend=True) for block in distinct]
    try:
        yield recorded
    finally:
        for handle in handles:
            handle.remove()


def _learn_alike(recorded: _Recorder, entry: BlockInputs, count: int) -> None:
    """After a batch: where it reached the last block, whether its blocks all took the first block's
    arguments (then batches up to its token count may stop at the first block; once they differ, none)."""
    if count < 2 or recorded.alike_up_to == -1 or len(recorded) < count:
        return
    tokens = _tokens((entry.hidden,), {})
    if entry.per_block is not None or tokens is None:
        recorded.alike_up_to = -1  # blocks differ (or cannot be told apart): every batch to the last block
    else:
        recorded.alike_up_to = max(recorded.alike_up_to or 0, tokens)


def capture_block_inputs(
    model: nn.Module,
    blocks: Sequence[nn.Module] | nn.Module,
    batches: Iterable[Any],
    storage: torch.device | str | None = None,
    progress: bool = False,
) -> list[BlockInputs]:
    """The first block's arguments for every batch, and every block's own where they differ, captured by
    running ``model`` up to its last block.

    Forward pre-hooks on the blocks record their positional and keyword arguments (attention mask,
    position embeddings or ids, ...) and raise a private exception that stops the forward pass: at the
    last block, until a batch has shown that every block takes the first block's arguments; after
    that, batches of at most as many tokens stop at the first block, as SparseGPT's and Wanda's
    drivers do (nothing but the embeddings runs; a sliding-window mask differs from a full one only
    beyond its window, so a longer batch is run to the last block again). Blocks of different types
    (sliding-window and full attention with their own masks or rotary embeddings; a position bias the
    first block computes and hands on) thus get their own arguments (:attr:`BlockInputs.per_block`,
    :meth:`BlockInputs.for_block`); a key/value cache object is dropped and ``use_cache`` turned off,
    so replayed calls never extend one. The model is called through :func:`call_model` (Hugging Face
    models with ``use_cache=False``), in eval mode and without gradients.

    Args:
        model: the whole model.
        blocks: its blocks in execution order (e.g. ``model.model.layers``, see
            :func:`ecp_fast.pruning.hf.resolve_blocks`), or the first block alone (then only its
            arguments are captured).
        batches: calibration batches as :class:`~ecp_fast.pruning.calibration.Calibrator` takes
            them (tensors, mappings, ``(inputs, targets)``).
        storage: where the captured tensors are kept (e.g. ``"cpu"`` to offload); None keeps them
            where they were computed.

    Returns:
        One :class:`BlockInputs` per batch; ``token_weights`` carries the batch's attention mask, so
        padding tokens count for nothing when the blocks are calibrated. Then
        ``inputs = inputs.with_hidden(inputs.for_block(index)(block))`` feeds each block's output to the
        next.
    """
    block_list = _blocks_to_capture(blocks)
    device = module_device(model)
    store = None if storage is None else torch.device(storage)
    captured: list[BlockInputs] = []
    with _recording(block_list) as recorded, eval_mode(model):
        for index, batch in enumerate(tqdm(batches, desc="capture", disable=not progress, leave=False)):
            inputs, _ = split_batch(batch)
            inputs = to_device(inputs, device)
            entry = _capture_one(model, inputs, recorded, index, len(block_list)).to(store)
            captured.append(entry)
            _learn_alike(recorded, entry, len(block_list))
    if not captured:
        raise ValueError("argument 'batches': the calibration data is empty (expected at least one batch, got 0)")
    logger.info("captured the first block's inputs for %d batches", len(captured))
    return captured
