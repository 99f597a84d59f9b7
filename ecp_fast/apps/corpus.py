"""An offline text corpus and a byte tokenizer, for language-model experiments without downloads.

The corpus is the documentation that ships with Python itself: the ``pydoc_data`` topics (the
language reference sections ``help()`` shows) and the docstrings of the standard library's modules,
classes and functions, read from its source files with :mod:`ast` (nothing is imported or run).
Documents are split into training and held-out text by a stable hash of their name, so the split
does not depend on the order in which files are found.

The tokenizer maps UTF-8 bytes to ids 0-255 (no vocabulary file, nothing to train); id 0 (the NUL
byte, absent from documentation) pads, and batches come as a tokenizer's would: ``input_ids`` and
``attention_mask``.
"""

from __future__ import annotations

import ast
import hashlib
import logging
import os
import sysconfig
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

#: Folders of the standard library whose files are not documentation of the library itself.
SKIPPED_FOLDERS = frozenset(
    {
        "test",
        "tests",
        "idle_test",
        "site-packages",
        "dist-packages",
        "__pycache__",
        "lib2to3",
        "turtledemo",
        "ensurepip",
        "venv",
    }
)
SOURCES = ("topics", "docstrings")
#: Separates documents in the concatenated text (a form feed: a byte that documentation rarely holds).
SEPARATOR = "\n\f\n"


@dataclass(frozen=True)
class Corpus:
    """Training and held-out text, as UTF-8 bytes, and how many documents each holds."""

    train: bytes
    heldout: bytes
    train_documents: int
    heldout_documents: int

    def __str__(self) -> str:
        return (
            f"corpus: {len(self.train) / 1e6:.2f} MB training text in {self.train_documents} documents, "
            f"{len(self.heldout) / 1e6:.2f} MB held out in {self.heldout_documents}"
        )


def pydoc_topics() -> Iterator[tuple[str, str]]:
    """``(name, text)`` of every ``pydoc_data.topics`` entry, sorted by name."""
    from pydoc_data.topics import topics

    for name in sorted(topics):
        yield f"topic:{name}", topics[name]


def stdlib_docstrings(root: str | os.PathLike[str] | None = None) -> Iterator[tuple[str, str]]:
    """``(qualified name, docstring)`` of the modules, classes and functions of the standard library.

    Files are parsed with :mod:`ast`, never imported; files that do not parse are skipped. Sorted by
    path, then in source order.
    """
    base = Path(root if root is not None else sysconfig.get_paths()["stdlib"])
    for directory, folders, files in os.walk(base):
        folders[:] = sorted(folder for folder in folders if folder not in SKIPPED_FOLDERS)
        for file in sorted(files):
            if not file.endswith(".py"):
                continue
            path = Path(directory) / file
            try:
                tree = ast.parse(path.read_text(encoding="utf-8"))
            except (SyntaxError, UnicodeDecodeError, ValueError, OSError):
                continue
            module = ".".join(path.relative_to(base).with_suffix("").parts)
            for node in ast.walk(tree):
                if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                    docstring = ast.get_docstring(node)
                    if docstring and len(docstring) >= 40:  # one-liners are mostly "Return x."
                        name = module if isinstance(node, ast.Module) else f"{module}.{node.name}:{node.lineno}"
                        yield name, docstring


def _held_out(name: str, fraction: float) -> bool:
    digest = hashlib.blake2b(name.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64 < fraction


def python_docs_corpus(
    sources: Sequence[str] = SOURCES,
    heldout_fraction: float = 0.05,
    max_bytes: int | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
) -> Corpus:
    """Python's bundled documentation as a training and a held-out text.

    Args:
        sources: ``"topics"`` (``pydoc_data``, about 0.5 MB) and/or ``"docstrings"`` (standard
            library docstrings, about 1.7 MB; parsing takes a few seconds, so it is cached).
        heldout_fraction: the share of documents held out, chosen by a hash of their names.
        max_bytes: stop adding documents once the training text has this many bytes.
        cache_dir: where the parsed text is cached (``corpus-<key>.train`` / ``.heldout``).
    """
    unknown = [source for source in sources if source not in SOURCES]
    if unknown or not sources:
        raise ValueError(f"argument 'sources' must name some of {SOURCES}, got {list(sources)}")
    if not 0.0 < heldout_fraction < 1.0:
        raise ValueError(f"argument 'heldout_fraction' must be in (0, 1), got {heldout_fraction}")
    key = hashlib.blake2b(
        repr((tuple(sources), heldout_fraction, max_bytes, sysconfig.get_python_version())).encode(), digest_size=6
    ).hexdigest()
    cached = None if cache_dir is None else Path(cache_dir) / f"corpus-{key}"
    if cached is not None and cached.with_suffix(".train").exists() and cached.with_suffix(".heldout").exists():
        train = cached.with_suffix(".train").read_bytes()
        heldout = cached.with_suffix(".heldout").read_bytes()
        return Corpus(train, heldout, train.count(SEPARATOR.encode()), heldout.count(SEPARATOR.encode()))
    train_parts: list[str] = []
    heldout_parts: list[str] = []
    size = 0
    for source in sources:
        documents = pydoc_topics() if source == "topics" else stdlib_docstrings()
        for name, text in documents:
            if _held_out(name, heldout_fraction):
                heldout_parts.append(text)
            else:
                if max_bytes is not None and size >= max_bytes:
                    continue
                train_parts.append(text)
                size += len(text.encode("utf-8")) + len(SEPARATOR)
    if not train_parts or not heldout_parts:
        raise ValueError(f"the corpus from {list(sources)} is too small to split (max_bytes={max_bytes})")
    train = (SEPARATOR.join(train_parts) + SEPARATOR).encode("utf-8")
    heldout = (SEPARATOR.join(heldout_parts) + SEPARATOR).encode("utf-8")
    if cached is not None:
        cached.parent.mkdir(parents=True, exist_ok=True)
        cached.with_suffix(".train").write_bytes(train)
        cached.with_suffix(".heldout").write_bytes(heldout)
    corpus = Corpus(train, heldout, len(train_parts), len(heldout_parts))
    logger.info("%s", corpus)
    return corpus


class ByteTokenizer:
    """UTF-8 bytes as token ids 0-255; id 0 pads. Calling it on texts returns a tokenizer's batch."""

    vocab_size = 256
    pad_token_id = 0

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``."""
        return list(text.encode("utf-8"))

    def decode(self, ids: Sequence[int] | torch.Tensor) -> str:
        """Text of ``ids`` (padding dropped; invalid UTF-8 replaced)."""
        values = ids.tolist() if isinstance(ids, torch.Tensor) else list(ids)
        return bytes(value for value in values if value != self.pad_token_id).decode("utf-8", errors="replace")

    def __call__(self, texts: str | Sequence[str], max_length: int | None = None) -> dict[str, torch.Tensor]:
        """``{"input_ids", "attention_mask"}`` ``(len(texts), longest)``, right-padded, cut at ``max_length``."""
        if isinstance(texts, str):
            texts = [texts]
        encoded = [self.encode(text)[:max_length] if max_length else self.encode(text) for text in texts]
        length = max((len(ids) for ids in encoded), default=0)
        input_ids = torch.full((len(encoded), length), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(encoded), length), dtype=torch.long)
        for row, ids in enumerate(encoded):
            input_ids[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
            attention_mask[row, : len(ids)] = 1
        return {"input_ids": input_ids, "attention_mask": attention_mask}


def token_windows(data: bytes, length: int, count: int | None = None, seed: int | None = None) -> torch.Tensor:
    """Windows of ``length`` byte ids ``(count, length)``: consecutive non-overlapping ones from the
    start (``seed=None``), or ``count`` at random offsets drawn with ``seed``."""
    if length < 2 or len(data) < length:
        raise ValueError(f"argument 'length' must be in [2, {len(data)}] for {len(data)} bytes, got {length}")
    ids = torch.frombuffer(bytearray(data), dtype=torch.uint8).long()
    if seed is None:
        windows = ids[: (ids.numel() // length) * length].reshape(-1, length)
        return windows if count is None else windows[:count]
    if count is None:
        raise ValueError("argument 'count' is required with a seed")
    generator = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - length + 1, (count,), generator=generator)
    return torch.stack([ids[start : start + length] for start in starts.tolist()])
