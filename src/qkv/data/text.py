"""Text → token ids on disk → batches of random windows.

A corpus (the bundled tiny Shakespeare, a text file, or a folder of text files) is encoded once into a flat
token file (a numpy memmap; uint8/uint16/uint32 by vocabulary size) cached under ``~/.cache/qkv/tokens`` and keyed
by a hash of the text and the tokenizer, so it is rebuilt exactly when either changes. The first 90% of the tokens
train, the last 10% validate. Batch ``i`` of a run is drawn from a generator seeded with ``(seed, i)``: the data
position of a run is one integer, and resuming at batch ``i`` reproduces the batches an uninterrupted run sees.
"""

from __future__ import annotations

import hashlib
import importlib.resources
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from ..checkpoint import write_atomic
from ..tokenizers import Tokenizer

__all__ = ["BUNDLED", "Corpus", "read_corpus", "token_dtype", "encode_to_file", "TokenSplits", "load_tokens",
           "WindowBatches", "cache_dir"]

BUNDLED = "tinyshakespeare"
TEXT_SUFFIXES = (".txt", ".md", ".text", ".rst")


@dataclass(frozen=True)
class Corpus:
    """The text to learn from and where it came from (a path, or ``tinyshakespeare`` for the bundled one)."""

    text: str
    source: str

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.text.encode("utf-8")).hexdigest()


def read_corpus(path: str | Path | None = None) -> Corpus:
    """The bundled tiny Shakespeare (``None`` or ``"tinyshakespeare"``), a UTF-8 text file, or a folder of them."""
    if path is None or str(path) == BUNDLED:
        resource = importlib.resources.files("qkv") / "data" / "tinyshakespeare.txt"
        return Corpus(resource.read_text(encoding="utf-8"), BUNDLED)
    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in TEXT_SUFFIXES)
        if not files:
            raise FileNotFoundError(f"folder {path} holds no text files ({', '.join(TEXT_SUFFIXES)}); "
                                    "point --data at a text file or a folder of .txt files")
        text = "\n".join(_read_text(p) for p in files)
    elif path.is_file():
        text = _read_text(path)
    else:
        raise FileNotFoundError(f"data file {path} does not exist; pass an existing text file or folder, "
                                f"or leave --data out to use the bundled {BUNDLED}")
    if not text.strip():
        raise ValueError(f"data {path} is empty; give it some text to learn from")
    return Corpus(text, str(path))


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"{path} is not UTF-8 text ({err.reason} at byte {err.start}); "
                         "convert it to UTF-8 or leave it out") from None


def token_dtype(vocab_size: int) -> np.dtype:
    """The smallest unsigned integer type that holds every id below ``vocab_size``."""
    for dtype in (np.uint8, np.uint16, np.uint32):
        if vocab_size - 1 <= np.iinfo(dtype).max:
            return np.dtype(dtype)
    raise ValueError(f"vocab_size={vocab_size} does not fit in 32-bit token ids")


def cache_dir() -> Path:
    """Where token files live: ``$QKV_CACHE_DIR``, else ``$XDG_CACHE_HOME/qkv``, else ``~/.cache/qkv``."""
    if os.environ.get("QKV_CACHE_DIR"):
        return Path(os.environ["QKV_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "qkv"


def encode_to_file(corpus: Corpus, tokenizer: Tokenizer, directory: str | Path | None = None) -> np.memmap:
    """Encode ``corpus`` once into ``<dir>/tokens/<hash>.<dtype>.bin`` and map it; reuse the file when it exists.

    The hash covers the text and the tokenizer's full definition, so a change in either builds a new file.
    """
    key = hashlib.sha256(corpus.sha256.encode() + tokenizer.backend.to_str().encode()).hexdigest()[:20]
    dtype = token_dtype(tokenizer.vocab_size)
    folder = Path(directory) if directory is not None else cache_dir()
    path = folder / "tokens" / f"{key}.{dtype.name}.bin"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        lines = corpus.text.splitlines(keepends=True)  # encode in pieces: parallel in Rust, bounded memory
        chunks = ["".join(lines[i:i + 2000]) for i in range(0, len(lines), 2000)]
        ids = np.fromiter((i for piece in tokenizer.encode_batch(chunks) for i in piece), dtype=np.int64)
        write_atomic(path, ids.astype(dtype).tobytes())  # a half-written cache never carries the final name
    return np.memmap(path, dtype=dtype, mode="r")


@dataclass
class TokenSplits:
    """The token stream split in two: ``train`` (the first part) and ``val`` (the last ``val_fraction``)."""

    train: np.ndarray
    val: np.ndarray


def load_tokens(corpus: Corpus, tokenizer: Tokenizer, *, val_fraction: float = 0.1,
                directory: str | Path | None = None) -> TokenSplits:
    """Encode (or reuse the cached encoding of) ``corpus`` and split it into train / validation tokens."""
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction={val_fraction} must lie strictly between 0 and 1")
    tokens = encode_to_file(corpus, tokenizer, directory)
    n_val = max(1, int(len(tokens) * val_fraction))
    return TokenSplits(tokens[: len(tokens) - n_val], tokens[len(tokens) - n_val:])


class WindowBatches:
    """Batches of ``window``-token slices of a token stream: random for training, fixed for evaluation.

    ``batch(i)`` is a pure function of ``(seed, i)``, so a run's data position is just the index of its next batch.
    """

    def __init__(self, tokens: np.ndarray, window: int, batch_size: int, *, seed: int = 0, name: str = "train"):
        if batch_size < 1 or window < 2:
            raise ValueError(f"batch_size={batch_size} and window={window} must be >= 1 and >= 2")
        if len(tokens) < window:
            raise ValueError(
                f"the {name} split holds {len(tokens)} tokens, fewer than one window of {window}: the corpus "
                "is shorter than one context window; use a longer text or a smaller --context"
            )
        self.tokens, self.window, self.batch_size, self.seed = tokens, window, batch_size, seed

    def _gather(self, starts: np.ndarray) -> Tensor:
        rows = np.stack([np.asarray(self.tokens[s:s + self.window], dtype=np.int64) for s in starts])
        return torch.from_numpy(rows)  # (batch, window)

    def batch(self, index: int) -> Tensor:
        """Training batch number ``index``: ``batch_size`` windows at random offsets, (batch, window) int64."""
        rng = np.random.default_rng([self.seed, index])
        return self._gather(rng.integers(0, len(self.tokens) - self.window + 1, size=self.batch_size))

    def fixed(self, n_batches: int) -> list[Tensor]:
        """Evaluation batches: ``n_batches`` of windows at evenly spaced offsets, the same every time."""
        n = max(1, min(n_batches * self.batch_size, len(self.tokens) // self.window))
        starts = np.linspace(0, len(self.tokens) - self.window, n).astype(np.int64)
        return [self._gather(starts[i:i + self.batch_size]) for i in range(0, n, self.batch_size)]
