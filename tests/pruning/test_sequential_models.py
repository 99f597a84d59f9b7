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


def _fed_and_real(model, blocks, batch) -> list[float]:
    """Per block: how far the inputs the library feeds it are from the real model's hidden states."""
    from ecp_fast.pruning.batches import capture_block_inputs

    fed = capture_block_inputs(model, blocks, [batch])[0]
    with torch.no_grad():
        real = model(**batch, output_hidden_states=True, use_cache=False).hidden_states
        gaps = []
        for index, block in enumerate(blocks[:-1]):
            fed = fed.with_hidden(fed.for_block(index)(block))
            gaps.append(float((fed.hidden - real[index + 1]).abs().max()))
    return gaps


def tiny_gemma2():
    """Layers of two kinds: sliding-window attention on every other layer, each kind its own mask."""
    torch.manual_seed(0)
    config = transformers.Gemma2Config(
        vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, sliding_window=4,
    )  # fmt: skip
    return transformers.Gemma2ForCausalLM(config).eval()


def test_blocks_of_different_kinds_are_fed_their_own_arguments_and_match_the_whole_model_prune() -> None:
    """Gemma2's full-attention layers take another mask than its sliding-window ones: each block gets
    its own, so the blocks see the real model's hidden states and a block-by-block prune equals the
    whole-model one (every block of a row scope is pruned from the same inputs either way)."""
    from ecp_fast.pruning.hf import resolve_blocks

    model = tiny_gemma2()
    batch = {"input_ids": torch.randint(0, 100, (4, 16), generator=torch.Generator().manual_seed(1))}
    assert max(_fed_and_real(model, resolve_blocks(model), batch)) < 1e-5
    batches = [
        {"input_ids": torch.randint(0, 100, (8, 16), generator=torch.Generator().manual_seed(i))} for i in range(3)
    ]
    whole, blocks = tiny_gemma2(), tiny_gemma2()
    ecp_fast.prune(whole, batches, 0.5, method="sparsegpt", scope="row", progress=False)
    ecp_fast.prune_sequential(blocks, batches, 0.5, method="sparsegpt", scope="row", progress=False)
    masks = [key for key in whole.state_dict() if key.endswith("weight_mask")]
    assert masks and all(torch.equal(whole.state_dict()[key], blocks.state_dict()[key]) for key in masks)


def test_a_position_bias_the_first_block_hands_on_reaches_the_later_blocks() -> None:
    torch.manual_seed(0)
    config = transformers.T5Config(vocab_size=100, d_model=32, d_ff=64, num_layers=3, num_heads=4, d_kv=8)
    model = transformers.T5ForConditionalGeneration(config).eval()
    ids = torch.randint(0, 100, (4, 16), generator=torch.Generator().manual_seed(2))
    from ecp_fast.pruning.batches import capture_block_inputs

    fed = capture_block_inputs(model, list(model.encoder.block), [{"input_ids": ids, "decoder_input_ids": ids}])[0]
    with torch.no_grad():
        real = model.encoder(input_ids=ids, output_hidden_states=True).hidden_states
        for index, block in enumerate(list(model.encoder.block)[:-1]):
            fed = fed.with_hidden(fed.for_block(index)(block))
            assert float((fed.hidden - real[index + 1]).abs().max()) < 1e-5


def test_a_batch_asking_for_a_cache_gets_the_same_prune_as_one_without() -> None:
    """``use_cache=True`` in the batches: no key/value cache object is replayed into every block call."""
    ids = [torch.randint(0, 20, (4, 16), generator=torch.Generator().manual_seed(i)) for i in range(2)]
    states = []
    for use_cache in (False, True):
        model = tiny_llama()
        batches = [{"input_ids": x, "use_cache": use_cache} for x in ids]
        padded = torch.ones(4, 16, dtype=torch.long)
        padded[0, 12:] = 0
        batches.append({"input_ids": ids[0], "attention_mask": padded, "use_cache": use_cache})
        ecp_fast.prune_sequential(model, batches, 0.5, method="wanda", progress=False)
        states.append(model.state_dict())
    assert all(torch.equal(states[0][key], states[1][key]) for key in states[0])


def test_where_every_block_takes_the_first_blocks_arguments_later_batches_stop_at_the_first_block() -> None:
    """The first batch runs up to the last block to see whether the blocks' arguments differ; a model
    whose blocks all take the same (Llama) runs no block for the other batches."""
    from ecp_fast.pruning.batches import capture_block_inputs

    model = tiny_llama()
    runs = []
    model.model.layers[0].register_forward_hook(lambda *_: runs.append(1))
    batches = [
        {"input_ids": torch.randint(0, 20, (2, 8), generator=torch.Generator().manual_seed(i))} for i in range(3)
    ]
    captured = capture_block_inputs(model, list(model.model.layers), batches)
    assert len(runs) == 1 and all(entry.per_block is None for entry in captured)


def test_a_batch_longer_than_every_one_seen_alike_is_run_to_the_last_block_again() -> None:
    """A first batch no longer than the sliding window shows no difference between the layers' masks; a
    longer one does, and gets each block's own arguments."""
    from ecp_fast.pruning.batches import capture_block_inputs

    torch.manual_seed(0)
    config = transformers.Qwen2Config(
        vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=2, use_sliding_window=True, sliding_window=4,
        layer_types=["sliding_attention", "full_attention"],
    )  # fmt: skip
    model = transformers.Qwen2ForCausalLM(config).eval()
    short, long = (torch.randint(0, 50, (1, n), generator=torch.Generator().manual_seed(n)) for n in (3, 10))
    captured = capture_block_inputs(model, list(model.model.layers), [{"input_ids": short}, {"input_ids": long}])
    assert captured[0].per_block is None and captured[1].per_block is not None
    assert max(_fed_and_real(model, list(model.model.layers), {"input_ids": long})) < 1e-5


def test_a_block_listed_twice_is_captured_at_each_of_its_positions() -> None:
    from ecp_fast.pruning.batches import capture_block_inputs

    torch.manual_seed(0)
    shared, other = torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)
    blocks = torch.nn.ModuleList([shared, other, shared])
    model = torch.nn.Sequential(*blocks)
    x = torch.randn(3, 4)
    captured = capture_block_inputs(model, blocks, [x])
    assert torch.equal(captured[0].hidden, x) and captured[0].per_block is None  # no arguments besides the hidden
