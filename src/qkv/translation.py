"""Translation with the encoder-decoder Transformer: parallel text → split → shared BPE → batches → BLEU.

The pipeline of "Attention Is All You Need" at laptop scale:

- :func:`read_parallel`: a tab-separated parallel file ``source<TAB>target`` (or a Tatoeba/manythings zip, read
  without extracting), bad lines skipped and counted;
- :func:`split_by_source`: a seeded train / validation / test split **by source sentence**, so one sentence and
  its many translations never sit on two sides of the split; the test set keeps every reference;
- :func:`train_shared_bpe`: one byte-level BPE vocabulary for both languages (NFC-normalised, accents kept),
  trained on the training split only;
- :class:`TokenBatches`: batches of similar-length pairs sized in tokens, with padding masks on both sides;
- :class:`Seq2SeqObjective`: teacher-forced cross-entropy, plugged into :mod:`qkv.train`'s trainer;
- :func:`translate` and :func:`evaluate_bleu`: greedy or beam search (:mod:`qkv.generate`) and corpus BLEU/chrF
  with ``sacrebleu`` on detokenized output against the raw references.
"""

from __future__ import annotations

import hashlib
import json
import random
import unicodedata
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import torch
from torch import Tensor, nn

from .checkpoint import claim_run_directory, read_run_info, resolve_checkpoint
from .config import ModelConfig
from .generate import generate_seq2seq, right_pad
from .losses import IGNORE_INDEX, cross_entropy
from .models import Transformer
from .tasks import EOS, TASKS
from .tokenizers import Tokenizer
from .train import OBJECTIVES, Objective, TrainConfig, Trainer, TrainResult, process_rank, run_recipe, say_once

__all__ = ["PAD_TOKEN", "BOS_TOKEN", "EOS_TOKEN", "ParallelCorpus", "read_parallel", "Splits", "split_by_source",
           "references_by_source", "train_shared_bpe", "encode_pairs", "Seq2SeqBatch", "pad_batch",
           "TokenBatches", "Seq2SeqObjective", "translate", "corpus_scores", "evaluate_bleu", "BleuResult",
           "TranslationData", "prepare", "translation_train_config", "train_translation", "resume_translation",
           "held_out_test_split", "validation_pair_batches", "bleu_report", "average_checkpoints"]

PAD_TOKEN, BOS_TOKEN, EOS_TOKEN = "<pad>", "<bos>", "<eos>"
SPECIAL_TOKENS = [PAD_TOKEN, BOS_TOKEN, EOS_TOKEN]  # ids 0, 1, 2: the layout of qkv.tasks as well

Pair = tuple[str, str]


# -- reading ------------------------------------------------------------------------------------------------------
@dataclass
class ParallelCorpus:
    """Sentence pairs read from one file, with what was skipped and why."""

    pairs: list[Pair]
    source: str  # where they came from: "path" or "path.zip:member"
    sha256: str  # of the raw bytes read
    skipped: dict[str, int] = field(default_factory=dict)  # reason → number of lines

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
    corpus = ParallelCorpus(pairs, source, hashlib.sha256(raw).hexdigest(), skipped)
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


# -- tokens -------------------------------------------------------------------------------------------------------
def train_shared_bpe(pairs: Sequence[Pair], vocab_size: int = 8000) -> Tokenizer:
    """One byte-level BPE vocabulary for both languages, trained on both sides of ``pairs``.

    Text is NFC-normalised (a precomposed "é" and "e" + combining acute become one form) and nothing else: no
    lower-casing, accents kept. Byte-level means any character encodes, so decode(encode(s)) == NFC(s).
    Special tokens: ``<pad>`` = 0, ``<bos>`` = 1, ``<eos>`` = 2.
    """
    from tokenizers import normalizers

    if not pairs:
        raise ValueError("cannot train a vocabulary on no sentence pairs")
    text = (unicodedata.normalize("NFC", side) + "\n" for pair in pairs for side in pair)
    tokenizer = Tokenizer.bpe(text, vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS)
    tokenizer.backend.normalizer = normalizers.NFC()
    ids = [tokenizer.token_to_id(t) for t in SPECIAL_TOKENS]
    assert ids == [0, 1, 2], f"special tokens landed at {ids}, expected [0, 1, 2]"
    return tokenizer


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


class TokenBatches:
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
        self._epoch: tuple[int, list[list[int]]] | None = None
        self.n_batches = len(self._plan(0))

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

    def _batches_of(self, epoch: int) -> list[list[int]]:
        if self._epoch is None or self._epoch[0] != epoch:
            self._epoch = (epoch, self._plan(epoch))
        return self._epoch[1]

    def make(self, indices: Sequence[int]) -> Seq2SeqBatch:
        return pad_batch([self.src[i] for i in indices], [self.tgt[i] for i in indices], pad_id=self.pad_id,
                         bos_id=self.bos_id)

    def batch(self, index: int) -> Seq2SeqBatch:
        """Training batch number ``index`` (epoch = index // n_batches)."""
        epoch, position = divmod(index, self.n_batches)
        return self.make(self._batches_of(epoch)[position])

    def fixed(self, n_batches: int) -> list[Seq2SeqBatch]:
        """The first ``n_batches`` batches of epoch 0 (all of them when there are fewer)."""
        return [self.make(b) for b in self._plan(0)[:n_batches]]

    def __len__(self) -> int:
        return self.n_batches


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


# -- the objective ------------------------------------------------------------------------------------------------
class Seq2SeqObjective(Objective):
    """L = -mean_t log P(y_t | y_<t, x): teacher forcing, label smoothing from the training options."""

    def loss(self, model: nn.Module, batch: Seq2SeqBatch, generator: torch.Generator, *,
             reduction: str = "mean") -> tuple[Tensor, int]:
        count = self.predicted(batch, generator)  # counted on the CPU: no wait for the device
        batch = batch.to(next(model.parameters()).device)
        logits = model(batch.src, batch.tgt_in, batch.src_mask, batch.tgt_mask)  # (batch, tgt_len, vocab)
        return (cross_entropy(logits, batch.tgt_out, label_smoothing=self.config.label_smoothing,
                              reduction=reduction), count)

    def predicted(self, batch: Seq2SeqBatch, generator: torch.Generator) -> int:
        """The real target tokens (``tgt_out`` is IGNORE_INDEX at padding)."""
        return int(batch.tgt_mask.sum())

    def tokens_in(self, batch: Seq2SeqBatch) -> int:
        """Real (unpadded) source plus target tokens."""
        return int(batch.src_mask.sum()) + int(batch.tgt_mask.sum())


OBJECTIVES.setdefault("seq2seq", Seq2SeqObjective)  # the trainer's hook for the encoder-decoder


# -- decoding and scoring -----------------------------------------------------------------------------------------
@torch.no_grad()
def translate(model: nn.Module, tokenizer: Tokenizer, sentences: Sequence[str], *, beam: int = 4,
              alpha: float = 0.6, batch_size: int = 64) -> list[str]:
    """Source sentences → detokenized translations, greedy (``beam=1``) or beam search (GNMT length penalty α).

    Sentences are translated in batches of similar length; the output keeps the input order. A source longer
    than the model's context is an error (never silently cut).
    """

    if beam < 1:
        raise ValueError(f"beam={beam} must be >= 1 (1 = greedy)")
    sentences = list(sentences)
    if not sentences:
        return []
    limit = model.config.max_seq_len
    eos = tokenizer.eos_id
    encoded = [ids + [eos] for ids in tokenizer.encode_batch(sentences)]
    for i, ids in enumerate(encoded):
        if len(ids) > limit:
            raise ValueError(f"sentence {i + 1} is {len(ids)} tokens long (with <eos>) and the model reads at most "
                             f"max_seq_len={limit}; split it into shorter sentences")
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
    out: list[str] = [""] * len(encoded)
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(order), batch_size):
            chunk = order[start:start + batch_size]
            src, mask = right_pad([encoded[i] for i in chunk], tokenizer.pad_id)
            targets = generate_seq2seq(model, src, mask, num_beams=beam, length_penalty=alpha,
                                       bos_token_id=tokenizer.bos_id, eos_token_id=eos,
                                       pad_token_id=tokenizer.pad_id)
            for i, ids in zip(chunk, targets, strict=True):
                out[i] = tokenizer.decode(ids)
    finally:
        model.train(was_training)
    return out


@dataclass
class BleuResult:
    """Corpus BLEU and chrF of one decoding over a test set, with the hypotheses."""

    bleu: float
    chrf: float
    signature: str
    sources: list[str]
    references: list[list[str]]
    hypotheses: list[str]
    beam: int
    seconds: float

    def summary(self) -> str:
        how = "greedy" if self.beam == 1 else f"beam {self.beam}"
        return (f"BLEU {self.bleu:.2f}  chrF {self.chrf:.2f}  ({how}, {len(self.sources):,} sentences, "
                f"{self.seconds:.0f} s; {self.signature})")

    def to_json(self) -> str:
        return json.dumps({"bleu": self.bleu, "chrf": self.chrf, "signature": self.signature, "beam": self.beam,
                           "sentences": len(self.sources), "seconds": self.seconds}, indent=2)


def corpus_scores(hypotheses: Sequence[str], references: Sequence[Sequence[str]]) -> tuple[float, float, str]:
    """(corpus BLEU with sacrebleu's default 13a tokenization, chrF, BLEU signature); any number of references
    per sentence."""
    try:
        import sacrebleu
    except ImportError:
        raise ImportError("BLEU needs sacrebleu: pip install 'qkv[bleu]'") from None
    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses but {len(references)} reference lists")
    most = max((len(r) for r in references), default=1)
    streams = [[refs[k] if k < len(refs) else None for refs in references] for k in range(most)]
    bleu = sacrebleu.metrics.BLEU()
    score = bleu.corpus_score(list(hypotheses), streams)
    chrf = sacrebleu.metrics.CHRF().corpus_score(list(hypotheses), streams)
    return score.score, chrf.score, str(bleu.get_signature())


def evaluate_bleu(model: nn.Module, tokenizer: Tokenizer, pairs: Sequence[Pair], *, beam: int = 4,
                  alpha: float = 0.6, limit: int | None = None, batch_size: int = 64) -> BleuResult:
    """Translate each distinct source of ``pairs`` and score corpus BLEU/chrF against all its references."""
    import time

    sources, references = references_by_source(pairs)
    if limit is not None:
        sources, references = sources[:limit], references[:limit]
    start = time.perf_counter()
    hypotheses = translate(model, tokenizer, sources, beam=beam, alpha=alpha, batch_size=batch_size)
    seconds = time.perf_counter() - start
    bleu, chrf, signature = corpus_scores(hypotheses, references)
    return BleuResult(bleu, chrf, signature, sources, references, hypotheses, beam, seconds)


# -- a whole run: parallel file → split → vocabulary → batches → trainer ------------------------------------------
@dataclass
class TranslationData:
    """Everything training needs from a parallel file. The test split is held here only to be *kept out*: the
    vocabulary and the batches are built from ``splits.train`` and ``splits.valid`` alone."""

    corpus: ParallelCorpus
    splits: Splits
    tokenizer: Tokenizer
    train: TokenBatches
    valid: TokenBatches
    dropped: int  # training/validation pairs longer than the context


def prepare(data: str | Path, *, max_seq_len: int, vocab_size: int = 8000, max_tokens: int = 2048,
            n_test: int = 2000, n_valid: int = 1000, split_seed: int = 1234, seed: int = 1337,
            tokenizer: Tokenizer | None = None) -> TranslationData:
    """Read, split by source sentence, train the shared BPE on the training split, batch train and validation."""
    corpus = read_parallel(data)
    splits = split_by_source(corpus.pairs, n_test=n_test, n_valid=n_valid, seed=split_seed)
    tok = tokenizer or train_shared_bpe(splits.train, vocab_size)
    train_src, train_tgt, dropped_train = encode_pairs(tok, splits.train, max_seq_len)
    valid_src, valid_tgt, dropped_valid = encode_pairs(tok, splits.valid or splits.train[:1], max_seq_len)
    batches = dict(pad_id=tok.pad_id, bos_id=tok.bos_id)
    return TranslationData(
        corpus, splits, tok,
        TokenBatches(train_src, train_tgt, max_tokens, seed=seed, name="train", **batches),
        TokenBatches(valid_src, valid_tgt, max_tokens, seed=seed, name="validation", **batches),
        dropped_train + dropped_valid,
    )


def translation_train_config(**overrides) -> TrainConfig:
    """The paper's training: Adam(0.9, 0.98, eps 1e-9), no weight decay, no clipping, label smoothing 0.1, the
    warm-up schedule lr = factor · d_model^-0.5 · min(step^-0.5, step · warmup^-1.5). (Dropout 0.1 is the model's.)

    The paper warms up for 4000 steps of 25k-token batches over 100k steps; an hour on a CPU gives ~1500 steps of
    2k-token batches, so the recipe warms up for 400 steps with factor 0.5: a peak of 1.6e-3 at d_model 256.
    """
    base = dict(schedule="noam", lr=0.5, warmup_steps=400, beta1=0.9, beta2=0.98, adam_eps=1e-9, weight_decay=0.0,
                label_smoothing=0.1, grad_clip=None, eval_every=100)
    return TrainConfig(**{**base, **overrides})


def train_translation(data: str | Path, model_config: ModelConfig, config: TrainConfig | None = None, *,
                      out_dir: str | Path = "runs/translate", max_tokens: int = 2048, n_test: int = 2000,
                      n_valid: int = 1000, split_seed: int = 1234, overwrite: bool = False,
                      print_fn=None) -> TrainResult:
    """Train an encoder-decoder ``Transformer`` on a parallel file; ``model_config.vocab_size`` is the size of the
    shared BPE vocabulary to learn. Checkpoints (with the split's settings, for ``qkv eval --bleu``) go to
    ``out_dir``."""
    say = print_fn or say_once
    config = config or translation_train_config()
    out_dir = Path(out_dir)
    with claim_run_directory(out_dir, overwrite=overwrite, primary=process_rank()[0] == 0):
        prepared = prepare(data, max_seq_len=model_config.max_seq_len, vocab_size=model_config.vocab_size,
                           max_tokens=max_tokens, n_test=n_test, n_valid=n_valid, split_seed=split_seed,
                           seed=config.seed)
        tok = prepared.tokenizer
        say(prepared.corpus.report())
        say(f"split by source sentence (seed {split_seed}): {prepared.splits.describe()}")
        if prepared.dropped:
            say(f"left out {prepared.dropped:,} pair(s) longer than max_seq_len={model_config.max_seq_len} tokens")
        model_config = model_config.replace(vocab_size=tok.vocab_size, pad_token_id=tok.pad_id,
                                            bos_token_id=tok.bos_id, eos_token_id=tok.eos_id)
        torch.manual_seed(config.seed)
        model = Transformer(model_config)
        run_info = {"recipe": "translation", "task": "translation", "data": str(Path(data).resolve()),
                    "data_sha256": prepared.corpus.sha256, "split_seed": split_seed, "n_test": n_test,
                    "n_valid": n_valid, "max_tokens": max_tokens, "model_type": "seq2seq", "tokenizer": "bpe"}
        trainer = Trainer(model, tok, prepared.train, prepared.valid, config, out_dir,
                          objective=Seq2SeqObjective(tok, config), run_info=run_info, print_fn=say)
        say(f"training a {model.num_parameters():,}-parameter Transformer ({model_config.n_encoder_layers}+"
            f"{model_config.n_decoder_layers} layers, d_model {model_config.d_model}, "
            f"{model_config.norm_position}-LN) on {len(prepared.train):,} batches of <= {max_tokens} tokens per "
            f"side, shared BPE vocabulary {tok.vocab_size:,}")
        return trainer.fit()


def held_out_test_split(checkpoint: str | Path) -> tuple[list[Pair], dict]:
    """The test pairs a translation checkpoint was held out from, rebuilt from the settings saved with it."""
    directory = resolve_checkpoint(checkpoint)
    run = read_run_info(directory)
    splits = _split_of_run(run, directory)
    return splits.test, run


def _split_of_run(run: dict, directory: Path, data: str | Path | None = None) -> Splits:
    """The train / validation / test split a translation run made, rebuilt from its saved settings (``data``:
    another parallel file, split the same way)."""
    if run_recipe(run) != "translation":
        raise ValueError(f"{directory} was not trained by the translation recipe (no split settings in its "
                         "trainer state); pass a checkpoint written by `qkv train --data PARALLEL_FILE`")
    corpus = read_parallel(data if data is not None else run["data"])
    if data is None and corpus.sha256 != run["data_sha256"]:
        raise ValueError(f"{run['data']} changed since {directory} was trained; its split cannot be rebuilt")
    return split_by_source(corpus.pairs, n_test=run["n_test"], n_valid=run["n_valid"], seed=run["split_seed"])


def validation_pair_batches(run: dict, tokenizer: Tokenizer, max_seq_len: int, directory: Path, *,
                            data: str | Path | None = None, split: str = "val", max_batches: int = 10_000
                            ) -> tuple[list[Seq2SeqBatch], str]:
    """The batches ``qkv eval`` scores a translation run on → (batches, where the pairs came from).

    ``split="val"``: the run's validation pairs, batched as training batched them (``max_tokens`` per side);
    ``"all"``: every pair of the file. Pairs longer than ``max_seq_len`` are left out, as in training."""
    source = data if data is not None else run.get("data")
    if split == "val":
        pairs = _split_of_run(run, directory, data).valid
    else:
        pairs = read_parallel(source).pairs
    src, tgt, _ = encode_pairs(tokenizer, pairs, max_seq_len)
    batches = TokenBatches(src, tgt, run.get("max_tokens", 2048), pad_id=tokenizer.pad_id, bos_id=tokenizer.bos_id,
                           name="validation" if split == "val" else "evaluation")
    return batches.fixed(max_batches), str(source)


def average_checkpoints(run_dir: str | Path, n: int) -> tuple[Transformer, Tokenizer, list[Path]]:
    """The paper's checkpoint averaging: θ = (1/n) Σ θ_i over the newest ``n`` checkpoints of a run directory."""
    from safetensors.torch import load_file

    from .checkpoint import WEIGHTS, load_checkpoint

    run_dir = Path(run_dir)
    steps = sorted(p for p in run_dir.glob("step-*") if p.is_dir() and (p / WEIGHTS).is_file())[-n:]
    if len(steps) < n:
        raise ValueError(f"{run_dir} holds {len(steps)} checkpoint(s), fewer than --average {n}; train with "
                         f"--keep-checkpoints {n} or average fewer")
    model, tokenizer, _ = load_checkpoint(steps[-1])
    total = {k: torch.zeros_like(v, dtype=torch.float64) for k, v in model.state_dict().items()}
    for step in steps:
        for k, v in load_file(str(step / WEIGHTS)).items():
            total[k] += v.double()
    model.load_state_dict({k: (v / n).to(model.state_dict()[k].dtype) for k, v in total.items()})
    return model.eval(), tokenizer, steps


def bleu_report(checkpoint: str | Path, *, beams: Sequence[int] = (1, 4), alpha: float = 0.6,
                limit: int | None = None, samples: int = 10, report: str | Path | None = None,
                average: int | None = None, print_fn=None) -> list[BleuResult]:
    """Score a translation checkpoint on its held-out test split, once per beam size; print the scores and
    ``samples`` example translations (source, output, references). ``report`` also writes them as JSON.
    ``average`` scores the average of the run directory's newest ``average`` checkpoints instead."""
    from .loading import load

    say = print_fn or say_once
    if average:
        model, tokenizer, steps = average_checkpoints(checkpoint, average)
        say(f"averaging {len(steps)} checkpoints: {', '.join(p.name for p in steps)}")
    else:
        model, tokenizer = load(checkpoint)
    if not isinstance(model, Transformer):
        raise TypeError(f"{checkpoint} holds a {type(model).__name__}; BLEU needs an encoder-decoder Transformer "
                        "trained with `qkv train vaswani-small --data PARALLEL_FILE`")
    test, run = held_out_test_split(checkpoint)
    results = []
    for beam in beams:
        result = evaluate_bleu(model, tokenizer, test, beam=beam, alpha=alpha, limit=limit)
        say(f"{'greedy' if beam == 1 else f'beam {beam} (alpha {alpha})'}: {result.summary()}")
        results.append(result)
    best = results[-1]
    for i in range(min(samples, len(best.sources))):
        say(f"  EN  {best.sources[i]}\n  MT  {best.hypotheses[i]}\n  REF {' | '.join(best.references[i])}")
    if report is not None:
        Path(report).write_text(json.dumps({
            "checkpoint": str(checkpoint), "averaged": average or 1,
            "test": {"data": run["data"], "split_seed": run["split_seed"], "sentences": len(best.sources)},
            "scores": [json.loads(r.to_json()) for r in results],
            "translations": [{"source": s, "references": refs, **{f"beam{r.beam}": r.hypotheses[i]
                                                                  for r in results}}
                             for i, (s, refs) in enumerate(zip(best.sources, best.references, strict=True))],
        }, indent=1, ensure_ascii=False) + "\n")
    return results


def resume_translation(model: Transformer, tokenizer: Tokenizer, state: dict, directory: Path, config: TrainConfig,
                       *, data: str | Path | None = None, out_dir: str | Path | None = None,
                       print_fn=None) -> TrainResult:
    """Continue a translation run (``qkv.train.resume`` hands it over): the same split, vocabulary and batches."""
    say = print_fn or say_once
    run = state["run"]
    prepared = prepare(data if data is not None else run["data"], max_seq_len=model.config.max_seq_len,
                       max_tokens=run["max_tokens"], n_test=run["n_test"], n_valid=run["n_valid"],
                       split_seed=run["split_seed"], seed=config.seed, tokenizer=tokenizer)
    if prepared.corpus.sha256 != run["data_sha256"]:
        raise ValueError(f"the data {prepared.corpus.source} differs from the file this run trained on "
                         f"({run['data']}); pass the same --data to resume, or start a new run")
    trainer = Trainer(model.train(), tokenizer, prepared.train, prepared.valid, config,
                      out_dir or directory.parent, objective=Seq2SeqObjective(tokenizer, config), run_info=run,
                      print_fn=say)
    trainer.load_state_dict(state)  # the optimizer's settings come back too, the paper's eps among them
    trainer.last_checkpoint = directory
    say(f"resuming {directory} at step {trainer.step} ({trainer.elapsed:.1f} s on the clock)")
    return trainer.fit()
