"""Transformers as users bring them (issue 12): tiny random-weight Llama, GPT-2 and BERT built from configs.

Nothing is downloaded: every model is built from a config with random weights. The trial failures
are tests: (1) a tied head never changes the input embedding; (2) GPT-2's Conv1D layers are pruned
through their (out, in) view; (3) save_pretrained / from_pretrained keeps the pruned outputs;
(4) a decoder block is called with the keyword arguments the model gives it; (5) tokenizer-style
dict batches, no output_fn, padding that counts for nothing, the head left out by default.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")

with warnings.catch_warnings():
    warnings.simplefilter("ignore", RuntimeWarning)
    import ecp_fast
from ecp_fast.pruning.batches import BlockInputs, capture_block_inputs, count_samples, sample_weights  # noqa: E402
from ecp_fast.pruning.hf import masks_from_zeros, prepare_for_save_pretrained, resolve_blocks  # noqa: E402
from ecp_fast.pruning.layers import resolve_layers  # noqa: E402

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.filterwarnings("ignore::UserWarning")]

VOCAB = 64


@pytest.fixture(autouse=True)
def quiet_transformers():
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    yield
    transformers.logging.set_verbosity(verbosity)


def tiny_llama(tie: bool = False, seed: int = 0, dtype: torch.dtype = torch.float32) -> nn.Module:
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=tie,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    return transformers.LlamaForCausalLM(config).to(dtype).eval()


def tiny_gpt2(seed: int = 0, dtype: torch.dtype = torch.float32) -> nn.Module:
    torch.manual_seed(seed)
    config = transformers.GPT2Config(
        vocab_size=VOCAB,
        n_embd=32,
        n_layer=2,
        n_head=4,
        n_positions=64,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    return transformers.GPT2LMHeadModel(config).to(dtype).eval()


def tiny_bert(seed: int = 0, dtype: torch.dtype = torch.float32) -> nn.Module:
    torch.manual_seed(seed)
    config = transformers.BertConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=64,
        pad_token_id=0,
    )
    return transformers.BertModel(config, add_pooling_layer=False).to(dtype).eval()


def token_batch(lengths: list[int], tokens: int = 10, seed: int = 1) -> transformers.BatchEncoding:
    """What a tokenizer returns: right-padded ids (pad 0) and the attention mask."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (len(lengths), tokens), generator=generator)
    mask = torch.zeros(len(lengths), tokens, dtype=torch.long)
    for row, length in enumerate(lengths):
        mask[row, :length] = 1
        ids[row, length:] = 0
    return transformers.BatchEncoding({"input_ids": ids, "attention_mask": mask})


def logits(model: nn.Module, batch) -> torch.Tensor:
    with torch.no_grad():
        return model(**batch).logits


# ---- (1) tied heads ------------------------------------------------------------------------------


def test_tied_llama_head_is_left_out_and_the_embedding_never_changes():
    model = tiny_llama(tie=True)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    embedding = model.model.embed_tokens.weight.detach().clone()
    pruner = ecp_fast.Pruner(model, sensitivity="local", progress=False)
    assert "lm_head" not in pruner.layers and len(pruner.layers) == 14
    pruner.calibrate([token_batch([10, 6])])
    pruner.prune(0.5, method="ecp", scope="row")
    torch.testing.assert_close(model.model.embed_tokens.weight, embedding, rtol=0, atol=0)
    with pytest.raises(ValueError, match="tied to model.embed_tokens.weight"):
        ecp_fast.Pruner(model, layers=["lm_head"])


def test_untied_llama_head_is_left_out_by_default_and_exclude_takes_patterns():
    model = tiny_llama()
    assert "lm_head" not in resolve_layers(model)
    assert "lm_head" in resolve_layers(model, include_output_head=True)
    no_mlp = resolve_layers(model, exclude=["*.mlp"])
    assert len(no_mlp) == 8 and all(".self_attn." in name for name in no_mlp)


# ---- (2) GPT-2's Conv1D ---------------------------------------------------------------------------------


def test_gpt2_conv1d_layers_are_scored_through_their_out_in_view():
    model = tiny_gpt2()
    specs = resolve_layers(model)
    expected = [
        f"transformer.h.{i}.{layer}"
        for i in range(2)
        for layer in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
    ]
    assert list(specs) == expected  # lm_head is tied to wte: left out
    c_attn = specs["transformer.h.0.attn.c_attn"]
    assert c_attn.kind == "conv1d" and (c_attn.fan_out, c_attn.fan_in) == (96, 32)
    pruner = ecp_fast.Pruner(model, sensitivity="output", probes=2, progress=False)
    pruner.calibrate([token_batch([10, 7])])
    for name, spec in specs.items():
        assert pruner.statistics[name].moments.mean.shape == (spec.fan_out, spec.fan_in)


def test_gpt2_row_pruning_removes_half_of_every_output_row():
    model = tiny_gpt2()
    before = {name: spec.weight_2d().clone() for name, spec in resolve_layers(model).items()}
    ecp_fast.prune(model, None, sparsity=0.5, method="magnitude", scope="row", progress=False)
    for name, spec in resolve_layers(model).items():
        weight = spec.weight_2d()
        assert (weight == 0).sum(dim=1).tolist() == [spec.fan_in // 2] * spec.fan_out, name
        # The removed weights are each row's smallest magnitudes of the (out, in) view.
        kept_min = torch.where(weight != 0, before[name].abs(), torch.inf).min(dim=1).values
        removed_max = torch.where(weight == 0, before[name].abs(), -torch.inf).max(dim=1).values
        assert bool((removed_max <= kept_min).all()), name


# ---- (3) save_pretrained / from_pretrained -------------------------------------------------------------------


def test_pruned_llama_with_compensation_biases_survives_save_and_load(tmp_path):
    model = tiny_llama()
    batch = token_batch([10, 6])
    pruner = ecp_fast.Pruner(model, sensitivity="output", probes=2, progress=False)
    pruner.calibrate([batch])
    report = pruner.prune(0.5, method="ecp", scope="row")
    assert len(report.added_biases) == 14
    expected = logits(model, batch)
    preparation = prepare_for_save_pretrained(model)
    assert preparation.config_switches == ["attention_bias", "mlp_bias"] and len(preparation.folded) == 14
    model.save_pretrained(tmp_path)
    loaded = transformers.LlamaForCausalLM.from_pretrained(tmp_path).eval()
    assert loaded.config.attention_bias and loaded.config.mlp_bias
    torch.testing.assert_close(logits(loaded, batch), expected, rtol=0, atol=0)
    assert sorted(masks_from_zeros(loaded)) == sorted(pruner.layers)  # ready to fine-tune with the zeros kept


def test_a_bias_added_where_one_switch_covers_more_layers_gets_zeros_on_the_others(tmp_path):
    model = tiny_llama()
    batch = token_batch([10, 8])
    pruner = ecp_fast.Pruner(model, sensitivity="local", layers=["model.layers.1.mlp.down_proj"], progress=False)
    pruner.calibrate([batch])
    pruner.prune(0.5, method="ecp", scope="row")
    expected = logits(model, batch)
    preparation = prepare_for_save_pretrained(model)
    assert preparation.config_switches == ["mlp_bias"]
    assert len(preparation.zero_biases) == 5  # gate/up of both blocks and down of block 0
    model.save_pretrained(tmp_path)
    loaded = transformers.LlamaForCausalLM.from_pretrained(tmp_path).eval()
    torch.testing.assert_close(logits(loaded, batch), expected, rtol=0, atol=0)


def test_pruned_gpt2_survives_save_and_load(tmp_path):
    model = tiny_gpt2()
    batch = token_batch([10, 5])
    pruner = ecp_fast.Pruner(model, sensitivity="output", probes=2, progress=False)
    pruner.calibrate([batch])
    pruner.prune(0.5, method="ecp", scope="2:4")
    expected = logits(model, batch)
    preparation = prepare_for_save_pretrained(model)
    assert preparation.config_switches == [] and len(preparation.folded) == 8
    model.save_pretrained(tmp_path)
    loaded = transformers.GPT2LMHeadModel.from_pretrained(tmp_path).eval()
    torch.testing.assert_close(logits(loaded, batch), expected, rtol=0, atol=0)
    assert loaded.lm_head.weight is loaded.transformer.wte.weight


def test_a_compensation_bias_the_architecture_cannot_hold_is_refused_before_any_change():
    model = tiny_llama()
    batch = token_batch([10, 9])
    pruner = ecp_fast.Pruner(model, sensitivity="local", layers=["lm_head"], progress=False)
    pruner.calibrate([batch])
    pruner.prune(0.5, method="ecp", scope="row")
    with pytest.raises(ValueError, match=r"layers \['lm_head'\] received compensation biases.*add_bias=False"):
        prepare_for_save_pretrained(model)
    assert hasattr(model.lm_head, "weight_mask")  # nothing was changed
    assert not model.config.attention_bias and not model.config.mlp_bias


# ---- (4) blocks with the keyword arguments the model gives them --------------------------------------------------


def final_hidden_states(model: nn.Module, before: nn.Module | None, batch) -> torch.Tensor:
    """The hidden states entering ``before`` (the final norm), or the model's last hidden state."""
    seen = []
    handle = None if before is None else before.register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    with torch.no_grad():
        output = model(**batch)
    if handle is not None:
        handle.remove()
        return seen[0]
    return output.last_hidden_state


@pytest.mark.parametrize("family", ["llama", "gpt2", "bert"])
def test_captured_block_inputs_reproduce_the_final_hidden_states(family):
    builders = {
        "llama": (tiny_llama, lambda m: m.model.norm),
        "gpt2": (tiny_gpt2, lambda m: m.transformer.ln_f),
        "bert": (tiny_bert, lambda m: None),
    }
    build, final_norm = builders[family]
    model = build(dtype=torch.float64)
    batches = [token_batch([10, 6], seed=1), token_batch([4, 10, 7], seed=2)]
    blocks = resolve_blocks(model)
    assert len(blocks) == 2
    captured = capture_block_inputs(model, blocks, batches)
    assert [entry.token_weights.sum().item() for entry in captured] == [16, 21]
    for entry, batch in zip(captured, batches, strict=True):
        assert entry.kwargs.get("use_cache", False) is False
        inputs = entry
        for block in blocks:
            inputs = inputs.with_hidden(inputs(block))
        expected = final_hidden_states(model, final_norm(model), batch)
        real = batch["attention_mask"].bool()
        torch.testing.assert_close(inputs.hidden[real], expected[real])


def test_a_llama_decoder_block_calibrates_and_prunes_on_its_captured_inputs():
    model = tiny_llama()
    batches = [token_batch([10, 6], seed=1), token_batch([3, 10], seed=2)]
    blocks = resolve_blocks(model, "model.layers")
    captured = capture_block_inputs(model, blocks, batches, storage="cpu")
    assert isinstance(captured[0], BlockInputs) and count_samples(captured[0]) == 16
    for sensitivity in ("local", "output"):
        block = tiny_llama().model.layers[0]
        pruner = ecp_fast.Pruner(block, sensitivity=sensitivity, probes=2, progress=False)
        result = pruner.calibrate(captured)
        assert result.samples == 29 and pruner.statistics["mlp.down_proj"].samples == 29
        report = pruner.prune(0.5, method="ecp", scope="row")
        assert report.sparsity == pytest.approx(0.5)


def test_resolve_blocks_errors_name_the_path():
    with pytest.raises(ValueError, match="'model.nothing'"):
        resolve_blocks(tiny_llama(), "model.nothing")
    with pytest.raises(ValueError, match="pass the attribute path"):
        resolve_blocks(nn.Sequential(nn.Linear(2, 2)))


# ---- (5) tokenizer batches, default output, padding ---------------------------------------------------------------


def test_tokenizer_batches_need_no_output_fn_and_padding_never_counts():
    model = tiny_llama(dtype=torch.float64)
    padded = token_batch([10, 4])
    assert sample_weights(padded).sum() == 14 and count_samples(padded) == 14
    with_padding = ecp_fast.Pruner(model, sensitivity="local", progress=False)
    result = with_padding.calibrate([padded])  # no output_fn, BatchEncoding called as model(**batch)
    assert result.samples == 14
    # The two sequences alone, without padding: a causal model's real tokens do not see the padding.
    separate = ecp_fast.Pruner(model, sensitivity="local", progress=False)
    separate.calibrate(
        [
            {"input_ids": padded["input_ids"][:1]},
            {"input_ids": padded["input_ids"][1:, :4]},
        ]
    )
    for name in with_padding.layers:
        ours, theirs = with_padding.statistics[name], separate.statistics[name]
        assert ours.samples == theirs.samples == 14
        for actual, expected in zip(ours.moments, theirs.moments, strict=True):
            torch.testing.assert_close(actual, expected)
        torch.testing.assert_close(ours.activation_sq_sum, theirs.activation_sq_sum)


def test_output_sensitivity_on_a_causal_lm_ignores_padding_tokens_and_their_logits():
    model = tiny_llama(dtype=torch.float64)
    batch = token_batch([10, 4])
    poisoned = transformers.BatchEncoding(dict(batch))
    poisoned["input_ids"] = batch["input_ids"].clone()
    poisoned["input_ids"][1, 4:] = 7  # other padding ids: nothing may change
    results = []
    for inputs in (batch, poisoned):
        pruner = ecp_fast.Pruner(model, sensitivity="output", probes=3, seed=5, progress=False)
        pruner.calibrate([inputs])
        results.append(pruner.statistics)
    for name in results[0]:
        for actual, expected in zip(results[1][name].moments, results[0][name].moments, strict=True):
            torch.testing.assert_close(actual, expected)
