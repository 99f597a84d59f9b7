"""Hugging Face models: their blocks, and saving a pruned one with ``save_pretrained``.

``transformers`` is never imported here: these helpers work on any ``nn.Module`` that follows its
conventions (a ``config`` attribute, ``save_pretrained``), so the library does not depend on it.

* :func:`resolve_blocks` finds a transformer's list of blocks (``model.layers``, ``transformer.h``,
  ``bert.encoder.layer``, ...), for :func:`~ecp_fast.pruning.batches.capture_block_inputs` and
  block-by-block pruning.
* :func:`prepare_for_save_pretrained` makes a pruned model survive ``save_pretrained`` /
  ``from_pretrained`` with the same outputs: masks are folded into the weights (``from_pretrained``
  knows no ``weight_orig`` / ``weight_mask`` and would re-initialise the weights), and compensation
  biases added to bias-free layers are carried through the architecture's config switch where it
  has one (Llama's ``attention_bias`` / ``mlp_bias``), else refused with the layers named (they
  would be dropped as unexpected keys).
  :func:`save_pretrained` does this and saves, checking the path first; if saving fails, the model is
  restored and the target folder is left as it was (transformers writes into a temporary folder
  next to it, whose files are moved in only once everything is written).
* :func:`masks_from_zeros` re-installs masks on a loaded model, to fine-tune it with the zeros kept.
"""

from __future__ import annotations

import copy
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ecp_fast.pruning.layers import layer_kind, resolve_layers, weight_parameter
from ecp_fast.pruning.masks import install_mask, remove_masks
from ecp_fast.pruning.transaction import model_transaction

logger = logging.getLogger(__name__)

#: Attribute paths of the block list in common architectures, tried in order by :func:`resolve_blocks`.
BLOCK_PATHS = (
    "model.layers",  # Llama, Mistral, Qwen2, Gemma, Phi-3 (causal LM)
    "layers",  # their base models (LlamaModel, ...)
    "transformer.h",  # GPT-2, GPT-J, Falcon, Bloom (causal LM)
    "h",  # their base models
    "gpt_neox.layers",  # GPT-NeoX, Pythia
    "model.decoder.layers",  # OPT
    "decoder.layers",
    "bert.encoder.layer",  # BERT heads
    "roberta.encoder.layer",
    "encoder.layer",  # BertModel, RobertaModel
    "transformer.layer",  # DistilBERT
    "transformer.blocks",  # MPT
    "blocks",
)


# ---- blocks ---------------------------------------------------------------------------------------


def _walk(model: nn.Module, path: str) -> Any:
    current: Any = model
    for part in path.split("."):
        if isinstance(current, (nn.ModuleList, nn.Sequential)) and part.isdigit():
            current = current[int(part)]
        elif hasattr(current, part):
            current = getattr(current, part)
        else:
            return None
    return current


def resolve_blocks(model: nn.Module, path: str | None = None) -> nn.ModuleList | nn.Sequential:
    """The model's blocks in execution order: the module list at attribute ``path`` (``"model.layers"``,
    ``"transformer.h"``, ``"bert.encoder.layer"``), or with ``path=None`` the first of
    :data:`BLOCK_PATHS` the model has.

    Raises:
        ValueError: ``path`` does not lead to a ``nn.ModuleList`` / ``nn.Sequential`` of modules, or
            no known path fits (then pass ``path``).
    """
    if path is not None:
        if not isinstance(path, str) or not path:
            raise TypeError(f"argument 'path' must be an attribute path such as 'model.layers', got {path!r}")
        found = _walk(model, path)
        if not isinstance(found, (nn.ModuleList, nn.Sequential)) or len(found) == 0:
            raise ValueError(
                f"argument 'path': {path!r} must lead to a non-empty nn.ModuleList or nn.Sequential of blocks in "
                f"{type(model).__name__}, got {type(found).__name__ if found is not None else 'nothing'}"
            )
        return found
    for candidate in BLOCK_PATHS:
        found = _walk(model, candidate)
        if isinstance(found, (nn.ModuleList, nn.Sequential)) and len(found) > 0:
            logger.info("blocks of %s found at %r (%d blocks)", type(model).__name__, candidate, len(found))
            return found
    raise ValueError(
        f"argument 'path': no block list found in {type(model).__name__} at any of {list(BLOCK_PATHS)}; "
        "pass the attribute path of its blocks, e.g. path='model.layers'"
    )


# ---- save_pretrained ------------------------------------------------------------------------------------


@dataclass
class SavePreparation:
    """What :func:`prepare_for_save_pretrained` changed.

    Attributes:
        folded: layers whose masks were folded into their weights.
        config_switches: config attributes set to True so that the architecture has the biases.
        zero_biases: layers that got a zero bias because a switch gives them one.
    """

    folded: list[str] = field(default_factory=list)
    config_switches: list[str] = field(default_factory=list)
    zero_biases: list[str] = field(default_factory=list)


def _architecture_shapes(model: nn.Module, config: Any) -> dict[str, tuple[int, ...]]:
    """The state-dict entries the model's class builds from ``config`` and their shapes (on the meta
    device: no memory)."""
    with torch.device("meta"):
        fresh = type(model)(config)
    return {key: tuple(value.shape) for key, value in fresh.state_dict().items()}


def _architecture_keys(model: nn.Module, config: Any) -> set[str]:
    """The state-dict keys the model's class builds from ``config``."""
    return set(_architecture_shapes(model, config))


def _check_shapes(model_shapes: dict[str, tuple[int, ...]], expected: dict[str, tuple[int, ...]]) -> None:
    """``ValueError`` where a parameter has another shape than the config builds (neurons removed)."""
    changed = sorted(key for key, shape in model_shapes.items() if key in expected and expected[key] != shape)
    if changed:
        shown = ", ".join(f"{key} {model_shapes[key]} (config: {expected[key]})" for key in changed[:4])
        raise ValueError(
            f"argument 'model': parameters have other shapes than its config builds ({shown}"
            f"{', ...' if len(changed) > 4 else ''}): it was changed in a way save_pretrained cannot express "
            "(e.g. neurons removed); save its state_dict or use ecp_fast.export.save_compact instead"
        )


def _bias_switches(config: Any) -> list[str]:
    """Boolean config attributes that are off and whose name says they switch biases on."""
    names = config.to_dict().keys() if hasattr(config, "to_dict") else vars(config).keys()
    return sorted(name for name in names if "bias" in name.lower() and getattr(config, name, None) is False)


def _bias_layer(key: str) -> str:
    return key[: -len(".bias")]


def prepare_for_save_pretrained(model: nn.Module) -> SavePreparation:
    """Make a pruned Hugging Face model reload with ``from_pretrained`` and give the same outputs.

    1. Masks (``torch.nn.utils.prune``) are folded into the weights: ``from_pretrained`` does not
       know ``weight_orig`` / ``weight_mask`` and would re-initialise every masked weight.
    2. Biases that compensation added to bias-free layers would be dropped as unexpected keys. Where
       the architecture has a config switch that gives those layers a bias (Llama's
       ``attention_bias`` and ``mlp_bias``), it is set to True and every layer the switch affects
       gets a bias, zeros where compensation added none, so the outputs do not change.

    Checks come first: when some added bias has no switch, nothing is changed and ``ValueError``
    names the layers. Call ``model.save_pretrained(path)`` afterwards (or use :func:`save_pretrained`);
    :func:`masks_from_zeros` re-installs masks on the reloaded model for fine-tuning.

    Raises:
        TypeError: ``model`` has no ``config`` (not a Hugging Face model).
        ValueError: compensation biases that the architecture cannot hold.
    """
    config = getattr(model, "config", None)
    if config is None:
        raise TypeError(f"argument 'model' must be a Hugging Face model with a config, got {type(model).__name__}")
    # Compare keys and shapes with the masks folded: weight_orig/weight_mask become weight.
    model_shapes = {
        key.replace(".weight_orig", ".weight"): tuple(value.shape)
        for key, value in model.state_dict().items()
        if not key.endswith(".weight_mask")
    }
    model_keys = set(model_shapes)
    expected_shapes = _architecture_shapes(model, config)
    expected = set(expected_shapes)
    unexpected = _unexpected_biases(model_keys, expected)
    _check_shapes(model_shapes, expected_shapes)
    switches: list[str] = []
    if unexpected:
        switches, expected = _bias_config_switches(model, config, model_keys, expected, unexpected)
    # Every check passed: change the model.
    preparation = SavePreparation(config_switches=switches)
    preparation.folded = remove_masks(model)
    if switches:
        preparation.zero_biases = _add_zero_biases(model, sorted(expected - model_keys))
        for switch in switches:
            setattr(config, switch, True)
        logger.info(
            "set %s on the config; zero biases added to %d layers so that the saved model keeps the compensation",
            ", ".join(f"{switch}=True" for switch in switches),
            len(preparation.zero_biases),
        )
    return preparation


def _unexpected_biases(model_keys: set[str], expected: set[str]) -> list[str]:
    """The model's keys its architecture does not build, all biases (else ``ValueError``), sorted."""
    unexpected = sorted(model_keys - expected)
    missing_now = sorted(expected - model_keys)
    if missing_now:
        raise ValueError(
            f"the model lacks parameters its architecture has "
            f"({missing_now[:8]}{' ...' if len(missing_now) > 8 else ''}); "
            "it was changed in a way save_pretrained cannot express (e.g. neurons removed); save its state_dict instead"
        )
    stray = [key for key in unexpected if not key.endswith(".bias")]
    if stray:
        raise ValueError(
            f"the model has parameters its architecture does not build: {stray}; save its state_dict instead"
        )
    return unexpected


def _bias_config_switches(
    model: nn.Module, config: Any, model_keys: set[str], expected: set[str], unexpected: list[str]
) -> tuple[list[str], set[str]]:
    """The config switches that give the ``unexpected`` biases a place, and the keys the switched config builds.

    Raises ``ValueError`` when some bias has no switch, or a switch would add other parameters too.
    """
    switches: list[str] = []
    new_config = copy.deepcopy(config)
    base = expected
    for switch in _bias_switches(config):
        trial = copy.deepcopy(config)
        setattr(trial, switch, True)
        gives = _architecture_keys(model, trial) - base
        if gives & set(unexpected):
            switches.append(switch)
            setattr(new_config, switch, True)
    expected = _architecture_keys(model, new_config) if switches else base
    uncovered = sorted(_bias_layer(key) for key in set(unexpected) - expected)
    if uncovered:
        tried = _bias_switches(config)
        raise ValueError(
            f"layers {uncovered} received compensation biases, but {type(model).__name__} has no bias there "
            f"(no config switch adds one{'; tried ' + ', '.join(tried) if tried else ''}), "
            "so from_pretrained would drop them and change the outputs. Prune those layers without bias "
            "compensation (add_bias=False in Pruner, prune or prune_sequential, or a method that does not "
            "compensate), leave them out (exclude=[...]), or save the state_dict instead"
        )
    extra_missing = sorted(expected - model_keys)
    not_biases = [key for key in extra_missing if not key.endswith(".bias")]
    if not_biases:
        raise ValueError(f"config switches {switches} would also add non-bias parameters {not_biases}; not applied")
    return switches, expected


def _add_zero_biases(model: nn.Module, keys: list[str]) -> list[str]:
    """A zero bias for each ``<layer>.bias`` in ``keys``; returns the layers."""
    modules = dict(model.named_modules())
    names = []
    for key in keys:
        name = _bias_layer(key)
        module = modules[name]
        stored = weight_parameter(module)
        kind = layer_kind(module)
        outputs = stored.shape[1] if kind == "conv1d" else stored.shape[0]
        zeros = torch.zeros(outputs, dtype=stored.dtype, device=stored.device)
        module.bias = nn.Parameter(zeros, requires_grad=stored.requires_grad)  # trainable as the weight is
        names.append(name)
    return names


def save_pretrained(model: nn.Module, path: str | os.PathLike[str], **kwargs: Any) -> SavePreparation:
    """:func:`prepare_for_save_pretrained`, then ``model.save_pretrained(path, **kwargs)``.

    ``path`` is checked before the model is touched. Preparing changes the model in place (masks
    folded, config switches set, zero biases added); if preparing or saving fails, the model and its
    config are restored as they were (this holds one CPU copy of the model's tensors while saving).

    The folder is changed only when everything was written: transformers saves into a temporary
    folder next to ``path`` (same filesystem), whose entries are then moved into ``path``, replacing
    same-named ones, and shard files of an earlier save that the new one does not replace are
    removed, as transformers does. If anything fails, the folder is left as it was: files it held
    are put back, and a folder that did not exist (with any parents created for it) is removed.
    With ``distributed_checkpoint=True`` every rank must write into the same folder, so
    transformers writes into ``path`` directly.

    Raises:
        TypeError: ``model`` has no ``save_pretrained``, or ``path`` is not a ``str`` / ``os.PathLike``.
        ValueError: ``path`` is empty, an existing file, or below a file (cannot be a directory).
    """
    save = getattr(model, "save_pretrained", None)
    if not callable(save):
        raise TypeError(
            f"argument 'model' must be a Hugging Face model with save_pretrained, got {type(model).__name__}"
        )
    directory = _check_save_path(path)
    config = getattr(model, "config", None)
    # The config is no module, so the transaction does not cover it: its switches are put back here.
    config_attributes = dict(vars(config)) if hasattr(config, "__dict__") else None
    with model_transaction(model, storage=torch.device("cpu")) as transaction:
        if config_attributes is not None:
            transaction.on_rollback(lambda: _restore_attributes(config, config_attributes))
        preparation = prepare_for_save_pretrained(model)
        if kwargs.get("distributed_checkpoint"):
            save(path, **kwargs)
        else:
            _save_through_staging(save, directory, kwargs)
    logger.info("saved to %s (masks of %d layers folded)", directory, len(preparation.folded))
    return preparation


def _check_save_path(path: object) -> str:
    """``path`` as a string once it names a directory that exists or can be created; else an error naming it."""
    text = os.fspath(path) if isinstance(path, (str, os.PathLike)) else None
    if not isinstance(text, str):  # None, bytes, a number, or a PathLike giving bytes
        raise TypeError(f"argument 'path' must be a directory path (str or os.PathLike), got {type(path).__name__}")
    if not text:
        raise ValueError("argument 'path' must be a directory path, got an empty string")
    if os.path.exists(text) and not os.path.isdir(text):
        # transformers would log an error and save nothing
        raise ValueError(f"argument 'path': {text!r} is an existing file, expected a directory (existing or new)")
    ancestor = os.path.dirname(os.path.abspath(text))
    while not os.path.exists(ancestor) and os.path.dirname(ancestor) != ancestor:  # the root stops it
        ancestor = os.path.dirname(ancestor)
    if os.path.exists(ancestor) and not os.path.isdir(ancestor):
        raise ValueError(f"argument 'path': {text!r} cannot be a directory, since {ancestor!r} is a file")
    return text


#: A shard file of a sharded save without its ``.safetensors`` / ``.bin`` suffix, as transformers matches it.
_SHARD_STEM = re.compile(r"(.*?)-\d{5}-of-\d{5}")


def _missing_directories(directory: str) -> list[str]:
    """``directory`` and those of its parents that do not exist yet, outermost first."""
    missing: list[str] = []
    current = directory
    while not os.path.exists(current) and os.path.dirname(current) != current:
        missing.insert(0, current)
        current = os.path.dirname(current)
    return missing


def _save_through_staging(save: Any, directory: str, kwargs: dict[str, Any]) -> None:
    """``save(staging, **kwargs)`` into a new folder next to ``directory``, then its entries moved into
    ``directory`` (:func:`_move_into`). On any failure ``directory`` is left as it was: the staging
    folder is removed, and so are ``directory`` and its parents where this call created them."""
    if kwargs.get("push_to_hub") and "repo_id" not in kwargs:
        # transformers names the repository after the folder it saves into: the target, not the staging folder
        kwargs = {**kwargs, "repo_id": directory.split(os.path.sep)[-1]}
    target = os.path.realpath(directory)
    created = _missing_directories(target)
    try:
        os.makedirs(os.path.dirname(target), exist_ok=True)
        staging = tempfile.mkdtemp(prefix=".ecp_fast-save-", dir=os.path.dirname(target))
        try:
            save(staging, **kwargs)
            os.makedirs(target, exist_ok=True)  # transformers creates it even when it writes nothing
            _move_into(staging, target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    except BaseException:
        for folder in reversed(created):
            try:
                os.rmdir(folder)
            except FileNotFoundError:  # not created yet when saving failed
                continue
            except OSError:  # not empty: something else wrote there
                break
        raise


def _stale_shards(target: str, written: list[str]) -> list[str]:
    """Shard files in ``target`` that transformers removes when saving there: shards of the weights
    it writes (``model-00001-of-00003.safetensors`` for ``model.safetensors``) that it does not write."""
    stems = set()
    for name in written:
        if name.endswith((".safetensors", ".bin")):
            stem = name.replace(".bin", "").replace(".safetensors", "")
            shard = _SHARD_STEM.fullmatch(stem)
            stems.add(shard.group(1) if shard else stem)
    return sorted(
        name
        for name in os.listdir(target)
        if name not in written
        and os.path.isfile(os.path.join(target, name))
        and any(name.startswith(stem) for stem in stems)
        and _SHARD_STEM.fullmatch(name.replace(".bin", "").replace(".safetensors", "")) is not None
    )


def _move_into(staging: str, target: str) -> None:
    """Move ``staging``'s entries into ``target``, replacing same-named ones, and remove stale shards.

    Replaced and removed entries are first moved aside into ``staging``; if a move fails, the entries
    moved in go back to ``staging`` and those moved aside are put back, so ``target`` is unchanged."""
    written = sorted(os.listdir(staging))
    aside = tempfile.mkdtemp(prefix=".replaced-", dir=staging)  # a name that is none of ``written``
    stale = _stale_shards(target, written)
    moved_aside: list[str] = []
    moved_in: list[str] = []
    try:
        for name in stale:
            os.replace(os.path.join(target, name), os.path.join(aside, name))
            moved_aside.append(name)
        for name in written:
            if os.path.lexists(os.path.join(target, name)):
                os.replace(os.path.join(target, name), os.path.join(aside, name))
                moved_aside.append(name)
            os.replace(os.path.join(staging, name), os.path.join(target, name))
            moved_in.append(name)
    except BaseException:
        for name in reversed(moved_in):
            os.replace(os.path.join(target, name), os.path.join(staging, name))
        for name in reversed(moved_aside):
            os.replace(os.path.join(aside, name), os.path.join(target, name))
        raise


def _restore_attributes(target: Any, saved: dict[str, Any]) -> None:
    """Put ``target``'s instance attributes back to ``saved`` (bypassing any ``__setattr__`` logic)."""
    attributes = vars(target)
    attributes.clear()
    attributes.update(saved)


def masks_from_zeros(
    model: nn.Module, layers: Sequence[str] | None = None, exclude: Sequence[str] | None = None
) -> list[str]:
    """Install a mask (1 where the weight is non-zero) on every layer :func:`~ecp_fast.pruning.layers.resolve_layers`
    selects that has zeros, so fine-tuning a reloaded pruned model keeps them; returns those layers."""
    masked = []
    for name, spec in resolve_layers(model, layers, exclude).items():
        stored = weight_parameter(spec.module)
        if hasattr(spec.module, "weight_mask") or bool((stored != 0).all()):
            continue
        install_mask(spec.module, (stored != 0).to(stored.dtype))
        masked.append(name)
    return masked
