"""``qkv study order``: does "dog bites man" differ from "man bites dog" to the model?

Self-attention sums over its keys, and a sum does not care about their order; only the positional encoding
(and, in a decoder, the causal mask) tells the model where each token stands. Three measurements, on characters
of the English side of the bundled Tatoeba corpus (``data/tatoeba-fra-eng-*.zip``):

(a) permutation: a trained encoder reads a sentence and the same tokens in a random order. Without positions
    its outputs are the original outputs permuted the same way (equivariance, up to rounding: computed in
    float64); with positions they are not, and the table says by how much.
(b) shuffled words: a masked-LM encoder per encoding, and causal language models, score held-out sentences and
    the same sentences with their words shuffled. The masked-LM score is the pseudo-log-likelihood (Salazar et
    al., 2020): each character masked in turn and predicted from all the others. Without positions the encoder
    sees the same bag of characters either way, so the gap is exactly zero. A causal model without positions
    has a gap all the same: the causal mask lets token t attend to t tokens, so what a token can see depends on
    where it is, and the model can learn positions from that (Haviv et al., 2022, "Transformer language models
    without positional encodings still learn positional information").
(c) "dog bites man" / "man bites dog": each trained model's distribution of the next character, and how far
    apart the two are (total variation distance, ½ Σ |p - q|).
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ..data import WindowBatches
from ..data.parallel import read_parallel
from ..models import DecoderLM, Encoder
from ..tokenizers import Tokenizer
from ..training import MASK_TOKEN, MaskedLM, NextToken, TrainConfig
from .fit import SmallModel, fit
from .positions import COLOURS, ENCODINGS
from .report import Progress, StudyResult, finish, pyplot, save_figure

__all__ = ["OrderSettings", "order_study", "shuffle_words", "permutation_difference", "pseudo_log_likelihood",
           "causal_loss", "float64_copy", "english_sentences", "DEFAULT_DATA", "SEED_PAIR"]

DEFAULT_DATA = "data/tatoeba-fra-eng-2017-09-29.zip"
SEED_PAIR = ("dog bites man", "man bites dog")
SEPARATOR = "\n"  # between sentences in the training stream; every evaluated sentence is read between two


@dataclass(frozen=True)
class OrderSettings:
    """The models, training runs and evaluation of the order study."""

    model: SmallModel = SmallModel(context=64)  # characters per training window
    mlm_steps: int = 300
    causal_steps: int = 200
    mlm_encodings: tuple[str, ...] = ENCODINGS
    causal_encodings: tuple[str, ...] = ENCODINGS
    batch_size: int = 32
    lr: float = 5e-3  # embeddings scaled by sqrt(d_model) start at unit size and move slowly: a large rate
    warmup: int = 30
    train_sentences: int | None = None  # None: every English sentence not held out
    eval_sentences: int = 200



FULL = OrderSettings()
QUICK = OrderSettings(SmallModel(context=48, d_model=32, n_heads=2, n_layers=1, d_ff=128), mlm_steps=250,
                      causal_steps=100, mlm_encodings=("none", "rope"), causal_encodings=("none", "rope"),
                      batch_size=16, lr=1e-2, warmup=10, train_sentences=6000, eval_sentences=40)


def shuffle_words(sentence: str, rng: random.Random, tries: int = 20) -> str | None:
    """The sentence's space-separated words in a random order different from the original; None when every
    order tried reads the same (e.g. all words equal). The characters are the same multiset either way."""
    words = sentence.split(" ")
    for _ in range(tries):
        order = words[:]
        rng.shuffle(order)
        if order != words:
            return " ".join(order)
    return None


def _resolve(path: str | Path | None) -> Path:
    """The parallel file: as given, else the default relative to the working directory or to the source tree."""
    candidate = Path(path or DEFAULT_DATA)
    if candidate.exists() or path is not None:
        return candidate
    in_tree = Path(__file__).resolve().parents[3] / DEFAULT_DATA  # src/qkv/study → the repository root
    if in_tree.exists():
        return in_tree
    raise FileNotFoundError(f"{DEFAULT_DATA} was not found (the Tatoeba zip ships in the repository's data/, "
                            "not in the wheel); run from the repository root or pass --data PATH")


def english_sentences(path: str | Path | None = None) -> list[str]:
    """The distinct English (first-column) sentences of a Tatoeba zip or ``english<TAB>other`` file, in order."""
    corpus = read_parallel(_resolve(path))
    return list(dict.fromkeys(src for src, _ in corpus.pairs))


@torch.no_grad()
def permutation_difference(encoder: Encoder, ids: Tensor, generator: torch.Generator) -> tuple[float, float]:
    """Encoder(ids permuted) against Encoder(ids) permuted the same way → (max |difference|,
    ‖difference‖ / ‖outputs‖). ids: (1, T). Both are zero, up to rounding, exactly when the encoder is
    permutation-equivariant; pass a float64 copy (:func:`float64_copy`) to push the rounding down to ~1e-15."""
    order = torch.randperm(ids.shape[1], generator=generator)
    hidden = encoder(ids)  # (1, T, d_model)
    difference = encoder(ids[:, order]) - hidden[:, order]
    return float(difference.abs().max()), float(difference.norm() / hidden.norm())


def float64_copy(model: Encoder | DecoderLM) -> Encoder | DecoderLM:
    """A float64 copy of a model, in eval mode (the original is left as it is)."""
    copy = type(model)(model.config)
    copy.load_state_dict(model.state_dict())
    return copy.double().eval()


@torch.no_grad()
def pseudo_log_likelihood(encoder: Encoder, ids: Tensor, score: Tensor, mask_id: int) -> Tensor:
    """-log P(x_i | every other token) with x_i replaced by the mask, for each position where ``score`` is True.

    ids (n, T) → losses (n, number of True in each row of score), nats. Each row is copied once per scored
    position, that position masked.
    """
    n, length = ids.shape
    positions = score[0].nonzero().view(-1)  # the same positions in every row
    inputs = ids.repeat_interleave(len(positions), dim=0)  # (n·P, T)
    rows = torch.arange(len(inputs))
    columns = positions.repeat(n)
    inputs[rows, columns] = mask_id
    logits = encoder.logits(encoder(inputs)[rows, columns])  # (n·P, vocab)
    return F.cross_entropy(logits.double(), ids[:, positions].reshape(-1), reduction="none").view(n, -1)


@torch.no_grad()
def causal_loss(model: DecoderLM, ids: Tensor) -> Tensor:
    """-log P(x_t | x_<t) for t = 1 .. T-1: ids (n, T) → losses (n, T - 1), nats."""
    logits = model(ids[:, :-1]).double()
    return F.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none")


def _by_length(pairs: list[tuple[list[int], list[int]]]) -> dict[int, tuple[Tensor, Tensor]]:
    """(original ids, shuffled ids) pairs grouped by length → {length: (originals (n, T), shuffled (n, T))}."""
    groups: dict[int, list[tuple[list[int], list[int]]]] = {}
    for original, shuffled in pairs:
        groups.setdefault(len(original), []).append((original, shuffled))
    return {t: (torch.tensor([a for a, _ in g]), torch.tensor([b for _, b in g])) for t, g in groups.items()}


def order_study(*, quick: bool = False, out_dir: str | Path = "runs/study", seed: int = 0, progress: bool = True,
                data: str | Path | None = None, settings: OrderSettings | None = None) -> StudyResult:
    """Train masked-LM encoders and causal LMs with each encoding, measure (a), (b), (c), write
    ``<out_dir>/order/``; → the result with tables ``permutation``, ``shuffled words``, ``dog bites man``."""
    s = settings or (QUICK if quick else FULL)
    started, cpu_started = time.perf_counter(), time.process_time()
    out = Path(out_dir) / "order"
    sentences = english_sentences(data)
    rng = random.Random(seed)
    rng.shuffle(sentences)  # the file is sorted by length: mix it before holding some out
    held_out: list[tuple[str, str]] = []
    rest: list[str] = []
    for sentence in sentences:
        n_words = len(sentence.split(" "))
        if len(held_out) < s.eval_sentences and 3 <= n_words <= 8 and len(sentence) <= s.model.context - 2:
            shuffled = shuffle_words(sentence, rng)
            if shuffled is not None:
                held_out.append((sentence, shuffled))
                continue
        rest.append(sentence)
    if not held_out:
        raise ValueError(f"{_resolve(data)} holds no English sentence of 3-8 words and at most "
                         f"{s.model.context - 2} characters to evaluate on; pass a larger parallel file")
    train_text = SEPARATOR.join(rest[: s.train_sentences]) + SEPARATOR
    tokenizer = Tokenizer.char(SEPARATOR.join(sentences) + SEPARATOR, special_tokens=[MASK_TOKEN])
    tokens = np.asarray(tokenizer.encode(train_text), dtype=np.int64)
    mask_id = tokenizer.mask_id
    train_config = TrainConfig(max_steps=1)  # the objectives read only mlm_probability and label_smoothing

    def encode(text: str) -> list[int]:
        return tokenizer.encode(SEPARATOR + text + SEPARATOR)

    groups = _by_length([(encode(a), encode(b)) for a, b in held_out])
    n_chars = sum(len(a) for a, _ in held_out)
    total = len(s.mlm_encodings) * s.mlm_steps + len(s.causal_encodings) * s.causal_steps
    shuffle_rows, permutation_rows, pair_rows = [], [], []
    distributions: dict[tuple[str, str], tuple[Tensor, Tensor]] = {}
    with Progress(total, "qkv study order", enabled=progress) as bar:
        for family, kinds, steps in (("masked LM", s.mlm_encodings, s.mlm_steps),
                                     ("causal LM", s.causal_encodings, s.causal_steps)):
            encoder = family == "masked LM"
            for kind in kinds:
                torch.manual_seed(seed)
                config = s.model.config(kind, tokenizer.vocab_size, encoder=encoder)
                model = Encoder(config) if encoder else DecoderLM(config)
                objective = (MaskedLM if encoder else NextToken)(tokenizer, train_config)
                windows = WindowBatches(tokens, s.model.context + objective.window_extra, s.batch_size, seed=seed)
                fit(model, objective, windows, steps=steps, lr=s.lr, warmup=s.warmup, seed=seed,
                    on_step=lambda step, loss, f=family, k=kind: bar.update(1, f"{f} {k} loss {loss:.3f}"))
                exact = float64_copy(model)  # float64: rounding stays ~1e-15, so "exactly zero" shows as zero
                losses = {"original": 0.0, "shuffled": 0.0}
                for originals, shuffled in groups.values():
                    score = torch.zeros_like(originals, dtype=torch.bool)
                    score[:, 1:-1] = True  # the sentence's characters, not the separators around it
                    for name, ids in (("original", originals), ("shuffled", shuffled)):
                        if encoder:
                            losses[name] += float(pseudo_log_likelihood(exact, ids, score, mask_id).sum())
                        else:  # predict each character from those before it (and the separator)
                            losses[name] += float(causal_loss(exact, ids[:, :-1]).sum())
                original, shuffled_loss = losses["original"] / n_chars, losses["shuffled"] / n_chars
                shuffle_rows.append({"model": family, "encoding": kind, "loss original (nats/char)": original,
                                     "loss shuffled (nats/char)": shuffled_loss,
                                     "gap (shuffled - original)": shuffled_loss - original})
                if encoder:
                    generator = torch.Generator().manual_seed(seed)
                    worst, relative = 0.0, 0.0
                    for ids, _ in groups.values():
                        for row in ids:
                            m, r = permutation_difference(exact, row.view(1, -1), generator)
                            worst, relative = max(worst, m), relative + r
                    permutation_rows.append({"encoding": kind, "max |difference|": worst,
                                             "relative difference (mean)": relative / len(held_out)})
                p, q = _next_token(exact, tokenizer, encoder, mask_id)
                distributions[(family, kind)] = (p, q)
                pair_rows.append({"model": family, "encoding": kind,
                                  f"top after '{SEED_PAIR[0]}'": _top(p, tokenizer),
                                  f"top after '{SEED_PAIR[1]}'": _top(q, tokenizer),
                                  "total variation": 0.5 * float((p - q).abs().sum())})

    result = StudyResult(
        name="order", quick=quick,
        title="Word order: what a Transformer knows of it with and without positional encodings",
        settings={"data": f"English side of {Path(data or DEFAULT_DATA).name}, characters",
                  "held-out sentences": f"{len(held_out)} (3-8 words, {n_chars} characters)",
                  "training text": f"{len(tokens):,} characters",
                  "model": f"{s.model.describe()}, embeddings x sqrt(d_model)",
                  "steps": f"masked LM {s.mlm_steps}, causal LM {s.causal_steps}", "batch": s.batch_size,
                  "lr": s.lr, "seed": seed, "threads": torch.get_num_threads()},
        tables={"permutation": permutation_rows, "shuffled words": shuffle_rows, "dog bites man": pair_rows},
        captions={
            "permutation": "Trained masked-LM encoders on each held-out sentence and on its characters in a random "
                           "order (float64): Encoder(x permuted) - Encoder(x) permuted.",
            "shuffled words": "Held-out sentences against the same sentences with their words shuffled. Masked "
                              "LM: pseudo-log-likelihood (each character masked in turn); causal LM: next-character "
                              "loss.",
            "dog bites man": "The next character after each phrase (masked LM: at a mask appended to it); top 3 "
                             "with probabilities; total variation = ½ Σ|p - q| between the two distributions.",
        },
    )
    return finish(result, out, lambda d: [_plot_gaps(shuffle_rows, d / "shuffled-gap.png"),
                      _plot_pair(distributions, tokenizer, d / "dog-bites-man.png")],
                  (started, cpu_started))


@torch.no_grad()
def _next_token(model, tokenizer: Tokenizer, encoder: bool, mask_id: int) -> tuple[Tensor, Tensor]:
    """P(next character) after each phrase of SEED_PAIR: (p, q), each (vocab,)."""
    out = []
    for phrase in SEED_PAIR:
        ids = tokenizer.encode(SEPARATOR + phrase)
        if encoder:  # the next character is the masked one at the end: "\n dog bites man <mask> \n"
            ids = torch.tensor([ids + [mask_id] + tokenizer.encode(SEPARATOR)])
            logits = model.logits(model(ids)[0, -2])
        else:
            logits = model(torch.tensor([ids]))[0, -1]
        out.append(torch.softmax(logits.double(), dim=-1))
    return out[0], out[1]


def _label(token: str) -> str:
    return {" ": "␣", "\n": "\\n"}.get(token, token)


def _top(p: Tensor, tokenizer: Tokenizer, k: int = 3) -> str:
    values, index = p.topk(k)
    return ", ".join(f"'{_label(tokenizer.id_to_token(int(i)))}' {float(v):.2f}" for v, i in zip(values, index,
                                                                                                    strict=True))


def _plot_gaps(rows: list[dict], path: Path) -> Path:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8, 4.5))
    labels = [f"{'MLM' if r['model'] == 'masked LM' else 'causal'}\n{r['encoding']}" for r in rows]
    gaps = [r["gap (shuffled - original)"] for r in rows]
    colours = [COLOURS[r["encoding"]] for r in rows]
    hatches = ["" if r["model"] == "masked LM" else "//" for r in rows]
    bars = ax.bar(range(len(rows)), gaps, color=colours, hatch=hatches, edgecolor="black", linewidth=0.5)
    for bar, gap in zip(bars, gaps, strict=True):
        text = "0 (exact)" if abs(gap) < 1e-6 else f"{gap:+.3f}"
        ax.annotate(text, (bar.get_x() + bar.get_width() / 2, max(gap, 0)), ha="center", va="bottom",
                    fontsize=8, xytext=(0, 2), textcoords="offset points")
    ax.set_xticks(range(len(rows)), labels, fontsize=8)
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_ylabel("shuffled - original loss (nats per character)")
    ax.set_title("Shuffling the words: how much worse each model scores the sentence\n"
                 "(plain: masked-LM encoders; hatched: causal LMs)", fontsize=11)
    ax.grid(alpha=0.3, axis="y")
    return save_figure(fig, path)


def _plot_pair(distributions: dict[tuple[str, str], tuple[Tensor, Tensor]], tokenizer: Tokenizer, path: Path,
               k: int = 6) -> Path:
    plt = pyplot()
    shown = [key for key in (("masked LM", "none"), ("masked LM", "rope"), ("causal LM", "none"),
                             ("causal LM", "rope")) if key in distributions]
    fig, axes = plt.subplots(2, 2, figsize=(9, 6), sharey=True)
    for ax, key in zip(axes.flat, shown, strict=False):
        p, q = distributions[key]
        index = torch.unique(torch.cat([p.topk(k).indices, q.topk(k).indices]))
        index = index[(p + q)[index].argsort(descending=True)][:k]
        x = torch.arange(len(index)).float()
        ax.bar((x - 0.2).tolist(), p[index].tolist(), width=0.4, label=f"'{SEED_PAIR[0]}'", color="tab:blue")
        ax.bar((x + 0.2).tolist(), q[index].tolist(), width=0.4, label=f"'{SEED_PAIR[1]}'", color="tab:orange")
        ax.set_xticks(x.tolist(), [_label(tokenizer.id_to_token(int(i))) for i in index])
        tv = 0.5 * float((p - q).abs().sum())
        ax.set_title(f"{key[0]}, positions: {key[1]} (TV {tv:.3f})", fontsize=10)
        ax.set_xlabel("next character")
        ax.grid(alpha=0.3, axis="y")
    for ax in axes[:, 0]:
        ax.set_ylabel("probability")
    for ax in axes.flat[len(shown):]:
        ax.set_visible(False)
    axes.flat[0].legend(fontsize=9)
    fig.suptitle("The next character after 'dog bites man' and after 'man bites dog'", fontsize=12)
    return save_figure(fig, path)
