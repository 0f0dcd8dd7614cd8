"""Parallel corpora → sentence pairs → batches an encoder-decoder trains on.

- :func:`read_parallel`: a tab-separated parallel file ``source<TAB>target`` (or a Tatoeba/manythings zip, read
  without extracting), bad lines skipped and counted;
- :func:`split_by_source`: a seeded train / validation / test split **by source sentence**, so one sentence and
  its many translations never sit on two sides of the split; the test set keeps every reference;
- :func:`encode_pairs` and :class:`TokenBatches`: batches of similar-length pairs sized in tokens, with padding
  masks on both sides; :class:`TaskBatches`: the same batches drawn from a synthetic task of :mod:`qkv.tasks`.
"""

from __future__ import annotations

import hashlib
import random
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import torch
from torch import Tensor

from ..losses import IGNORE_INDEX
from ..tasks import EOS, TASKS
from ..tokenizers import Tokenizer
from .batches import PlannedBatches
from .padding import right_pad

__all__ = ["Pair", "ParallelCorpus", "read_parallel", "Splits", "split_by_source", "references_by_source",
           "encode_pairs", "Seq2SeqBatch", "pad_batch", "TokenBatches", "TaskBatches"]

Pair = tuple[str, str]


# -- reading ------------------------------------------------------------------------------------------------------
@dataclass
class ParallelCorpus:
    """Sentence pairs read from one file, with what was skipped and why."""

    pairs: list[Pair]
    source: str  # where they came from: "path" or "path.zip:member"
    sha256: str  # of the raw bytes read
    skipped: dict[str, int] = field(default_factory=dict)  # reason → number of lines
    size: int | None = None  # of the raw bytes read

    @property
    def n_skipped(self) -> int:
        return sum(self.skipped.values())

    def report(self) -> str:
        """One line: how many pairs were read, and how many lines were skipped for each reason."""
        why = ", ".join(f"{n:,} {reason}" for reason, n in self.skipped.items() if n)
        return f"{len(self.pairs):,} sentence pairs from {self.source}" + (
            f"; skipped {self.n_skipped:,} bad line(s): {why}" if self.n_skipped else "")


def _read_bytes(path: Path, member: str | None) -> tuple[bytes, str]:
    """The raw bytes of a text file, or of one member of a zip (the largest ``*.txt`` not starting with ``_``)."""
    if not path.exists():
        raise FileNotFoundError(f"parallel file {path} does not exist; pass a tab-separated file "
                                "(source<TAB>target per line) or a Tatoeba zip such as data/tatoeba-fra-eng-*.zip")
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a directory; pass the parallel file itself")
    if not zipfile.is_zipfile(path):
        return path.read_bytes(), str(path)
    with zipfile.ZipFile(path) as archive:
        if member is None:
            texts = [i for i in archive.infolist() if i.filename.endswith(".txt")
                     and not Path(i.filename).name.startswith("_") and not i.is_dir()]
            if not texts:
                raise ValueError(f"{path} holds no sentence file (*.txt other than _about.txt); found "
                                 f"{', '.join(archive.namelist()) or 'nothing'}")
            member = max(texts, key=lambda i: i.file_size).filename
        elif member not in archive.namelist():
            raise FileNotFoundError(f"{path} has no member {member!r}; it holds {', '.join(archive.namelist())}")
        return archive.read(member), f"{path}:{member}"


def read_parallel(path: str | Path, *, member: str | None = None) -> ParallelCorpus:
    """Read ``source<TAB>target`` lines (UTF-8) from a text file or a zip; columns after the second are ignored.

    Lines without a tab, with an empty side, or not valid UTF-8 (a file of mixed encodings) are skipped and
    counted in ``skipped``; blank lines are ignored. Both sides are stripped of surrounding whitespace and are
    otherwise kept exactly as written (they are the references BLEU scores against). A file with no usable
    pair is an error.
    """
    path = Path(path)
    raw, source = _read_bytes(path, member)
    skipped = {"without a tab": 0, "with an empty side": 0, "not valid UTF-8": 0}
    pairs: list[Pair] = []
    for number, line in enumerate(raw.split(b"\n")):
        if number == 0 and line.startswith(b"\xef\xbb\xbf"):
            line = line[3:]  # a UTF-8 byte-order mark
        if not line.strip():
            continue
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError:
            skipped["not valid UTF-8"] += 1
            continue
        columns = text.rstrip("\r").split("\t")
        if len(columns) < 2:
            skipped["without a tab"] += 1
            continue
        src, tgt = columns[0].strip(), columns[1].strip()
        if not src or not tgt:
            skipped["with an empty side"] += 1
            continue
        pairs.append((src, tgt))
    corpus = ParallelCorpus(pairs, source, hashlib.sha256(raw).hexdigest(), skipped, len(raw))
    if not pairs:
        raise ValueError(f"{source} holds no usable sentence pair ({corpus.n_skipped} bad line(s) skipped: "
                         f"{', '.join(f'{n} {r}' for r, n in skipped.items() if n) or 'the file is empty'}); "
                         "each line must be UTF-8 text 'source<TAB>target' with both sides non-empty")
    return corpus


# -- the split ----------------------------------------------------------------------------------------------------
@dataclass
class Splits:
    """Train / validation / test pairs; every pair of one source sentence is in exactly one of them."""

    train: list[Pair]
    valid: list[Pair]
    test: list[Pair]
    seed: int

    def sources(self, name: str) -> set[str]:
        return {src for src, _ in getattr(self, name)}

    def describe(self) -> str:
        return ", ".join(f"{name} {len(self.sources(name)):,} sentences / {len(getattr(self, name)):,} pairs"
                         for name in ("train", "valid", "test"))


def split_by_source(pairs: Sequence[Pair], *, n_test: int = 2000, n_valid: int = 1000, seed: int = 1234) -> Splits:
    """Shuffle the distinct source sentences with ``seed``; the first ``n_test`` (with all their pairs) are the
    test set, the next ``n_valid`` the validation set, the rest the training set.

    Splitting by sentence rather than by pair matters on Tatoeba, where one English sentence has many
    translations: a pair split would put "I'm hungry." → "J'ai faim." in training and its twin
    "I'm hungry." → "Je meurs de faim." in test, and the test would measure memory, not translation.
    """
    groups: dict[str, list[Pair]] = {}
    for pair in pairs:
        groups.setdefault(pair[0], []).append(pair)
    sources = list(groups)
    if n_test < 1 or n_valid < 0:
        raise ValueError(f"n_test={n_test} must be >= 1 and n_valid={n_valid} >= 0")
    if n_test + n_valid >= len(sources):
        raise ValueError(f"the corpus has {len(sources):,} distinct source sentences, too few for a test set of "
                         f"{n_test:,} and a validation set of {n_valid:,} plus training; use a smaller "
                         "--test-size/--valid-size or a larger file")
    random.Random(seed).shuffle(sources)
    take = lambda chosen: [pair for src in chosen for pair in groups[src]]  # noqa: E731
    return Splits(train=take(sources[n_test + n_valid:]), valid=take(sources[n_test:n_test + n_valid]),
                  test=take(sources[:n_test]), seed=seed)


def references_by_source(pairs: Sequence[Pair]) -> tuple[list[str], list[list[str]]]:
    """Pairs → (distinct sources in first-seen order, all target references of each)."""
    refs: dict[str, list[str]] = {}
    for src, tgt in pairs:
        refs.setdefault(src, []).append(tgt)
    return list(refs), list(refs.values())


def encode_pairs(tokenizer: Tokenizer, pairs: Sequence[Pair], max_len: int
                 ) -> tuple[list[list[int]], list[list[int]], int]:
    """Pairs → (source ids + <eos>, target ids + <eos>, pairs dropped because a side exceeds ``max_len``).

    The decoder reads <bos> + target, so a target of n tokens needs n + 1 positions: both sides must fit in
    ``max_len`` (the model's max_seq_len). Longer pairs are left out of training and counted, never cut.
    """
    eos = tokenizer.eos_id
    srcs = tokenizer.encode_batch([p[0] for p in pairs])
    tgts = tokenizer.encode_batch([p[1] for p in pairs])
    keep_s, keep_t, dropped = [], [], 0
    for s, t in zip(srcs, tgts, strict=True):
        if len(s) + 1 > max_len or len(t) + 1 > max_len:
            dropped += 1
            continue
        keep_s.append(s + [eos])
        keep_t.append(t + [eos])
    return keep_s, keep_t, dropped


class Seq2SeqBatch(NamedTuple):
    """Right-padded, with masks True at real tokens. The decoder reads ``tgt_in`` = <bos> y_1..y_n and predicts
    ``tgt_out`` = y_1..y_n <eos> (IGNORE_INDEX at padding)."""

    src: Tensor  # (batch, src_len)
    src_mask: Tensor  # (batch, src_len) bool
    tgt_in: Tensor  # (batch, tgt_len)
    tgt_mask: Tensor  # (batch, tgt_len) bool
    tgt_out: Tensor  # (batch, tgt_len)

    def to(self, device: torch.device | str) -> Seq2SeqBatch:
        return Seq2SeqBatch(*(t.to(device, non_blocking=True) for t in self))


def pad_batch(src: Sequence[Sequence[int]], tgt: Sequence[Sequence[int]], *, pad_id: int = 0,
              bos_id: int = 1) -> Seq2SeqBatch:
    """Source rows and target rows (each ending in <eos>) → one padded :class:`Seq2SeqBatch`."""
    src_ids, src_mask = right_pad(src, pad_id)
    tgt_in, tgt_mask = right_pad([[bos_id, *t[:-1]] for t in tgt], pad_id)
    tgt_out, _ = right_pad(tgt, IGNORE_INDEX)
    return Seq2SeqBatch(src_ids, src_mask, tgt_in, tgt_mask, tgt_out)


class TokenBatches(PlannedBatches):
    """Batches of pairs of similar length holding at most ``max_tokens`` tokens (padding included) per side.

    Each epoch shuffles the pairs (seed, epoch), sorts them by length so a batch wastes little padding, cuts
    batches by the token budget and shuffles the batch order. ``batch(index)`` is a pure function of the index,
    which is what lets the trainer resume exactly; ``fixed(n)`` gives the first n batches of a fixed order
    (validation).
    """

    def __init__(self, src: Sequence[Sequence[int]], tgt: Sequence[Sequence[int]], max_tokens: int, *,
                 seed: int = 0, pad_id: int = 0, bos_id: int = 1, name: str = "train"):
        if len(src) != len(tgt):
            raise ValueError(f"{len(src)} sources but {len(tgt)} targets; pass one target per source")
        if not src:
            raise ValueError(f"the {name} set holds no sentence pairs; give a larger parallel file")
        longest = max(max(len(s), len(t)) for s, t in zip(src, tgt, strict=True))
        if max_tokens < longest:
            raise ValueError(f"max_tokens={max_tokens} cannot hold the longest {name} sentence ({longest} tokens); "
                             f"raise --batch-tokens to at least {longest}")
        self.src, self.tgt, self.max_tokens = list(src), list(tgt), max_tokens
        self.seed, self.pad_id, self.bos_id, self.name = seed, pad_id, bos_id, name
        self._plan_first_epoch()

    def _plan(self, epoch: int) -> list[list[int]]:
        """The batches (lists of pair indices) of one epoch, in the order they are served."""
        rng = random.Random(self.seed * 1_000_003 + epoch)
        order = list(range(len(self.src)))
        rng.shuffle(order)
        order.sort(key=lambda i: (len(self.src[i]), len(self.tgt[i])))  # stable: ties stay shuffled
        batches, current, widest = [], [], 0
        for i in order:
            width = max(widest, len(self.src[i]), len(self.tgt[i]))
            if current and width * (len(current) + 1) > self.max_tokens:
                batches.append(current)
                current, width = [], max(len(self.src[i]), len(self.tgt[i]))
            current.append(i)
            widest = width
        batches.append(current)
        rng.shuffle(batches)
        return batches

    def make(self, indices: Sequence[int]) -> Seq2SeqBatch:
        return pad_batch([self.src[i] for i in indices], [self.tgt[i] for i in indices], pad_id=self.pad_id,
                         bos_id=self.bos_id)


class TaskBatches:
    """Batches of a synthetic task from :mod:`qkv.tasks` (copy, reverse, sort, addition), fresh for every index.

    Batch ``index`` is drawn with a generator seeded by (seed, index), so the stream is reproducible and a
    training batch never repeats; ``fixed(n)`` draws from a disjoint seed (held-out examples).
    """

    def __init__(self, task: str, size: int, vocab_size: int, batch_size: int, *, seed: int = 0):

        if task not in TASKS:
            raise ValueError(f"unknown task {task!r}; choose one of {', '.join(TASKS)}")
        self.make_task, self.size, self.vocab_size = TASKS[task], size, vocab_size
        self.batch_size, self.seed = batch_size, seed

    def draw(self, n: int, seed: int) -> tuple[Tensor, Tensor]:
        """(src (n, S), tgt (n, T) = <bos> … <eos>) from the task generator."""
        return self.make_task(n, self.size, self.vocab_size, generator=torch.Generator().manual_seed(seed))

    @staticmethod
    def as_batch(src: Tensor, tgt: Tensor) -> Seq2SeqBatch:
        """The source ends in <eos>, as a translation source does; the decoder reads tgt[:-1], predicts tgt[1:]."""
        src = torch.cat([src, torch.full((src.shape[0], 1), EOS)], dim=1)
        every = torch.ones_like(src, dtype=torch.bool)
        return Seq2SeqBatch(src, every, tgt[:, :-1], torch.ones_like(tgt[:, :-1], dtype=torch.bool), tgt[:, 1:])

    def batch(self, index: int) -> Seq2SeqBatch:
        return self.as_batch(*self.draw(self.batch_size, self.seed * 1_000_003 + index))

    def fixed(self, n_batches: int) -> list[Seq2SeqBatch]:
        return [self.as_batch(*self.draw(self.batch_size, -1 - self.seed * 1_000_003 - i))
                for i in range(n_batches)]
