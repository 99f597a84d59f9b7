"""prune_sequential's errors: bad arguments named before any block runs, and a failure that says
in which block it happened and what was restored or left pruned."""

from __future__ import annotations

import logging
import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")

with warnings.catch_warnings():
    warnings.simplefilter("ignore", RuntimeWarning)
    import ecp_fast
from fingerprint import assert_unchanged, failing_after, fingerprint  # noqa: E402
from test_sequential import Failing, make_inputs, make_stack  # noqa: E402
from test_transformers import quiet_transformers, tiny_gpt2, tiny_llama, token_batch  # noqa: E402, F401

from ecp_fast import get_masks  # noqa: E402
from ecp_fast.pruning import sequential  # noqa: E402

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.filterwarnings("ignore::UserWarning")]


def counting_first_block(model: torch.nn.Module) -> list[int]:
    """Counts the calls of the first block: capture and calibration both run it."""
    calls = [0]
    model.transformer.h[0].register_forward_pre_hook(lambda module, args: calls.__setitem__(0, calls[0] + 1))
    return calls


# ---- a single batch where batches are expected -------------------------------------------------------------


@pytest.mark.parametrize("build", [tiny_gpt2, tiny_llama], ids=["gpt2", "llama"])
@pytest.mark.parametrize("single", ["tensor", "mapping"])
def test_a_single_batch_for_the_whole_model_is_refused_like_for_a_block_list(build, single) -> None:
    model = build()
    batch = token_batch([10, 7])
    inputs = batch["input_ids"] if single == "tensor" else batch
    before = fingerprint(model)
    shown = "a single tensor" if single == "tensor" else r"a single mapping \(BatchEncoding, one batch\)"
    with pytest.raises(TypeError, match=f"argument 'inputs' must be an iterable of batches.*got {shown}; wrap it"):
        ecp_fast.prune_sequential(model, inputs, progress=False)
    assert_unchanged(before, model)


# ---- arguments --------------------------------------------------------------------------------------------


BAD_ARGUMENTS = [
    (dict(inputs=None), TypeError, "argument 'inputs' must be an iterable of batches .*got NoneType"),
    (dict(inputs=[]), ValueError, "argument 'inputs': the calibration data is empty"),
    (dict(seed="0"), TypeError, "argument 'seed' must be an integer, got str '0'"),
    (dict(seed=1.5), TypeError, "argument 'seed' must be an integer, got float"),
    (dict(device="gpu0"), ValueError, "argument 'device' must name a device such as 'cpu' or 'cuda:0', got 'gpu0'"),
    (dict(device="cuda:99"), ValueError, "argument 'device': 'cuda:99' is not available in this process"),
    (dict(device="meta"), ValueError, "argument 'device': blocks cannot compute on 'meta'"),
    (dict(device=0.5), TypeError, "argument 'device' must be a torch.device, a string.*got float"),
    (dict(method="nope"), ValueError, r"argument 'method' must be one of \[.*'ecp-obs'.*'sparsegpt'.*\], got 'nope'"),
    (dict(reconstruct="no"), TypeError, "argument 'reconstruct' must be a bool, got str 'no'"),
    (dict(allocation="nope", reconstruct=True), ValueError, r"argument 'allocation' must be one of \("),
    (dict(allocation="search"), ValueError, "argument 'allocation' splits the sparsity only when pruning reconstructs"),
    (dict(allocation="uniform", method="ecp"), ValueError, "got allocation='uniform' with method='ecp'"),
    (dict(allocation="search", method="sparsegpt"), ValueError, "argument 'allocation': scope='layer' prunes every"),
    (dict(probes=0), ValueError, "argument 'probes' must be a positive integer or None, got 0"),
    (dict(atomic="yes"), TypeError, "argument 'atomic' must be a bool, got str 'yes'"),
    (dict(offload_activations=1), TypeError, "argument 'offload_activations' must be a bool, got int 1"),
]


@pytest.mark.parametrize("kwargs, error, match", BAD_ARGUMENTS, ids=[str(case[0]) for case in BAD_ARGUMENTS])
def test_bad_arguments_are_named_before_any_block_runs(kwargs, error, match) -> None:
    model = tiny_gpt2()
    calls = counting_first_block(model)
    before = fingerprint(model)
    kwargs = dict(kwargs)
    inputs = kwargs.pop("inputs", [token_batch([10, 7])])
    with pytest.raises(error, match=match):
        ecp_fast.prune_sequential(model, inputs, progress=False, **kwargs)
    assert calls == [0]  # nothing was captured or calibrated
    assert_unchanged(before, model)


def test_an_allocation_is_refused_only_where_nothing_would_use_it() -> None:
    model = tiny_gpt2()
    with pytest.raises(ValueError, match="argument 'allocation' splits the sparsity only when pruning reconstructs"):
        ecp_fast.prune_sequential(model, [token_batch([10, 7])], scope="global", allocation="uniform", progress=False)
    assert not get_masks(model)
    report = ecp_fast.prune_sequential(
        model, [token_batch([10, 7])], method="sparsegpt", scope="global", allocation="uniform", progress=False
    )
    assert [block.report.allocation for block in report.blocks] == ["uniform", "uniform"]


# ---- which block failed -----------------------------------------------------------------------------------


def failing_stack() -> torch.nn.Sequential:
    stack = make_stack(blocks=2)
    stack.append(Failing())
    return stack


@pytest.mark.parametrize(
    "atomic, outcome, pruned",
    [
        (False, "blocks 0-1 stay pruned (atomic=False)", {"0.fc1", "0.fc2", "1.fc1", "1.fc2"}),
        (True, "every block was restored", set()),
    ],
)
def test_the_error_and_the_log_say_which_block_failed(caplog, atomic, outcome, pruned) -> None:
    stack = failing_stack()
    message = f"prune_sequential failed in block 2 of 3 (Failing); {outcome}"
    with caplog.at_level(logging.WARNING, logger=sequential.__name__):
        with pytest.raises(RuntimeError, match="shapes cannot be multiplied") as caught:  # the user's error as it was
            ecp_fast.prune_sequential(stack, make_inputs(), sparsity=0.5, atomic=atomic, progress=False)
    assert caught.value.__notes__ == [message]
    assert [record.getMessage() for record in caplog.records if record.levelno >= logging.WARNING] == [message]
    assert set(get_masks(stack)) == pruned


def test_a_block_whose_forward_pass_failed_after_pruning_is_said_to_stay_pruned(monkeypatch) -> None:
    stack = make_stack(blocks=3)
    monkeypatch.setattr(sequential, "_forward", failing_after(1, sequential._forward, OSError("disk full")))
    with pytest.raises(OSError, match="disk full") as caught:
        ecp_fast.prune_sequential(stack, make_inputs(), sparsity=0.5, atomic=False, progress=False)
    assert caught.value.__notes__ == [
        "prune_sequential failed in block 1 of 3 (MLPBlock); blocks 0-1 stay pruned (atomic=False)"
    ]
    assert set(get_masks(stack)) == {"0.fc1", "0.fc2", "1.fc1", "1.fc2"}


def test_a_whole_model_failure_names_the_block_by_its_path() -> None:
    model = tiny_gpt2()

    def broken(module: torch.nn.Module, args: tuple) -> None:
        raise RuntimeError("failure inside the block")

    model.transformer.h[1].register_forward_pre_hook(broken)
    with pytest.raises(RuntimeError, match="failure inside the block") as caught:
        ecp_fast.prune_sequential(model, [token_batch([10, 7])], atomic=False, progress=False)
    assert caught.value.__notes__ == [
        "prune_sequential failed in block 1 of 2 (transformer.h.1, GPT2Block); block 0 stays pruned (atomic=False)"
    ]
    assert hasattr(model.transformer.h[0].attn.c_attn, "weight_mask")
    assert not hasattr(model.transformer.h[1].attn.c_attn, "weight_mask")
