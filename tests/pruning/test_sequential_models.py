"""prune_sequential on whole Hugging Face models: blocks found by path, their arguments captured."""

from __future__ import annotations

import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")

with warnings.catch_warnings():
    warnings.simplefilter("ignore", RuntimeWarning)
    import ecp_fast
from fingerprint import assert_unchanged, fingerprint  # noqa: E402
from test_transformers import logits, tiny_gpt2, tiny_llama, token_batch  # noqa: E402

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.filterwarnings("ignore::UserWarning")]


@pytest.mark.parametrize("method", ["wanda", "sparsegpt", "ecp-obs"])
@pytest.mark.parametrize("build", [tiny_llama, tiny_gpt2], ids=["llama", "gpt2"])
def test_whole_model_is_pruned_block_by_block_with_its_own_arguments(build, method) -> None:
    model = build()
    batches = [token_batch([10, 7, 4], seed=seed) for seed in range(2)]
    report = ecp_fast.prune_sequential(model, batches, sparsity=0.5, method=method, progress=False)
    assert len(report.blocks) == 2
    assert report.samples == 2 * (10 + 7 + 4)  # real tokens only
    assert report.sparsity == pytest.approx(0.5, abs=0.03)
    assert torch.isfinite(logits(model, batches[0])).all()
    head = model.get_output_embeddings()
    assert not hasattr(head, "weight_mask")  # the output head is left out


def test_a_failure_in_the_second_block_restores_the_first(monkeypatch) -> None:
    model = tiny_llama()
    batches = [token_batch([10, 6])]
    before = fingerprint(model)
    from ecp_fast.pruning import sequential

    original = sequential._prune_block
    calls = {"count": 0}

    def failing(*args, **kwargs):
        calls["count"] += 1
        if calls["count"] == 2:
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    monkeypatch.setattr(sequential, "_prune_block", failing)
    with pytest.raises(KeyboardInterrupt):
        ecp_fast.prune_sequential(model, batches, sparsity=0.5, method="sparsegpt", progress=False)
    assert_unchanged(before, model)
