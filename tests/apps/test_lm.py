"""``ecp-fast experiment lm --quick``: the offline corpus, the byte tokenizer and the whole run."""

from __future__ import annotations

import csv
import warnings

import pytest
import torch

with warnings.catch_warnings():
    warnings.simplefilter("ignore", RuntimeWarning)
    import ecp_fast  # noqa: F401
from ecp_fast.apps.corpus import ByteTokenizer, python_docs_corpus, token_windows


def test_byte_tokenizer_round_trips_and_pads_like_a_tokenizer():
    tokenizer = ByteTokenizer()
    text = "def f(x):\n    return x ** 2  # é"
    assert tokenizer.decode(tokenizer.encode(text)) == text
    batch = tokenizer([text, "ab"], max_length=8)
    assert batch["input_ids"].shape == (2, 8)
    assert batch["attention_mask"].tolist()[1] == [1, 1, 0, 0, 0, 0, 0, 0]
    assert tokenizer.decode(batch["input_ids"][1]) == "ab"


def test_corpus_is_python_documentation_split_by_document(tmp_path):
    corpus = python_docs_corpus(["topics"], max_bytes=100_000, cache_dir=tmp_path)
    assert len(corpus.train) >= 100_000 and corpus.heldout and corpus.heldout_documents >= 1
    assert b"assert" in corpus.train + corpus.heldout  # the language reference is there
    again = python_docs_corpus(["topics"], max_bytes=100_000, cache_dir=tmp_path)  # from the cache
    assert again.train == corpus.train and again.heldout == corpus.heldout
    windows = token_windows(corpus.train, 32, count=5, seed=0)
    assert windows.shape == (5, 32) and windows.dtype == torch.long and int(windows.max()) < 256
    with pytest.raises(ValueError, match="sources"):
        python_docs_corpus(["wikipedia"])


def test_settings_and_methods_are_parsed_and_checked():
    from ecp_fast.apps.experiments import lm

    settings = lm.parse_settings("50%:row,0.7:layer,2:4")
    assert [(s.label, s.sparsity, s.scope) for s in settings] == [
        ("50% row", 0.5, "row"),
        ("70% layer", 0.7, "layer"),
        ("2:4", None, "2:4"),
    ]
    for bad in ("50%", "150%:row", "4:2", "50%:diagonal", ""):
        with pytest.raises(ValueError, match="--settings"):
            lm.parse_settings(bad)
    assert lm.parse_methods("ecp, wanda,ecp") == ["ecp", "wanda"]
    with pytest.raises(ValueError, match="'no-such-method'"):
        lm.check_methods(["no-such-method"])


@pytest.mark.slow
def test_quick_run_writes_table_csv_and_plot(tmp_path, capsys):
    pytest.importorskip("transformers")
    from ecp_fast.apps.cli import main

    threads = torch.get_num_threads()
    try:
        status = main(["experiment", "lm", "--quick", "--out", str(tmp_path), "--methods", "magnitude,ecp"])
    finally:
        torch.set_num_threads(threads)
    assert status == 0
    with (tmp_path / "lm_results.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert [(row["method"], row["setting"]) for row in rows] == [("dense", "")] + [
        (method, setting) for method in ("magnitude", "ecp") for setting in ("50% row", "70% row", "2:4")
    ]
    for row in rows[1:]:
        assert float(row["sparsity"]) == pytest.approx(float(row["target"]) if row["scope"] != "2:4" else 0.5, abs=0.01)
        assert float(row["perplexity"]) > 1.0 and float(row["seconds"]) >= 0.0
    assert (tmp_path / "lm_perplexity.png").stat().st_size > 0
    assert "held-out perplexity" in (tmp_path / "lm_tables.md").read_text()
    assert "held-out perplexity" in capsys.readouterr().out
    # A second run reuses the trained model from the cache.
    main(["experiment", "lm", "--quick", "--out", str(tmp_path), "--methods", "magnitude", "--settings", "2:4"])
    assert "cached" in (tmp_path / "lm_tables.md").read_text()
