"""Scoring trained checkpoints: the loss and perplexity of any run, and BLEU/chrF of a translation run.

- :func:`evaluate_checkpoint`: mean cross-entropy per predicted token and perplexity, on the batches the run's
  recipe rebuilds (a text's windows, or a translation run's validation pairs): what ``qkv eval`` prints;
- :func:`corpus_scores`, :func:`evaluate_bleu`, :func:`bleu_report`: corpus BLEU (sacrebleu, 13a) and chrF of
  detokenized translations against every raw reference of the held-out test split: ``qkv eval --bleu``; a chat
  model (a decoder) translates by instruction the test split of a parallel file, split as the translation recipe
  splits it.

This module sits above :mod:`qkv.recipes`: it rebuilds a run's data through the recipe the run recorded.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from .checkpoint import (
    STATE_JSON,
    average_checkpoints,
    load_checkpoint,
    read_run_info,
    read_trainer_state_json,
    resolve_checkpoint,
)
from .data import Pair, read_parallel, references_by_source, split_by_source
from .extras import require
from .loading import find_base, is_adapter_run, load
from .losses import perplexity
from .models import model_type_of
from .quantize import quantize as quantize_model
from .recipes import recipe_of_run
from .recipes.translation import held_out_test_split, translate
from .tokenizers import Tokenizer
from .training import OBJECTIVES, TrainConfig, mean_loss, say_once

__all__ = ["evaluate_checkpoint", "BleuResult", "corpus_scores", "evaluate_bleu", "bleu_report"]


def evaluate_checkpoint(checkpoint: str | Path, data: str | Path | None = None, *, split: str = "val",
                        batch_size: int = 32, context: int | None = None, max_batches: int = 10_000,
                        quantize: str | None = None, dtype: Any = None, base: bool = False) -> dict:
    """Loss (nats per predicted token, no label smoothing) and perplexity exp(loss) of a checkpoint: the
    validation loss as the trainer computes it (``qkv.training.mean_loss``, with the run's own options and seed),
    so on the batches the trainer validated on, the trainer's figure and this one are the same number.

    Dispatches on the recipe the run recorded. A language model or masked LM: on a text, ``data`` defaulting to
    the one the run trained on; ``split`` "val" takes its last 10%, "all" the whole text. A translation run: the
    target-side loss on its validation pairs, rebuilt from the split saved with it (``data``: another parallel
    file, split the same way; "all": every pair of the file). ``quantize`` ("int8" | "int4") scores the model with
    its linear layers quantized as ``qkv.load(..., quantize=)`` does; ``dtype`` (``torch.bfloat16``) casts the rest.
    ``base=True`` scores a fine-tuning run's base model, as it was before the run, on the same batches: the
    "before" beside the run's "after" (ValueError for a run that did not start from one).
    """
    if split not in ("val", "all"):
        raise ValueError(f"split={split!r} is not one of val, all")
    if base:
        directory = resolve_checkpoint(checkpoint)
        record = read_run_info(directory).get("base")
        if not record:
            raise ValueError(f"{checkpoint} is not a fine-tuning run (no base model recorded); --base scores the "
                             "model a `qkv train --init-from` run started from")
        model, tok = load(find_base(record, directory))
    elif is_adapter_run(checkpoint):  # a LoRA run: its base with the adapters
        directory = resolve_checkpoint(checkpoint)
        model, tok = load(directory)
    else:
        model, tok, directory = load_checkpoint(checkpoint)
    if quantize is not None:
        quantize_model(model, quantize)
    if dtype is not None:
        model = model.to(dtype)
    run = read_run_info(directory)  # {} for a checkpoint without training state: the bundled corpus
    if model.model_type not in OBJECTIVES:
        raise ValueError(f"no evaluation objective for model_type={model.model_type!r}")
    options = _training_options(directory)  # a masked LM's mask rate and the seed of its masks, as in training
    objective = OBJECTIVES[model.model_type](tok, options)
    batches, source = recipe_of_run(run).evaluation_batches(
        model, tok, objective, run, directory, data=data, split=split, batch_size=batch_size, context=context,
        max_batches=max_batches)
    loss = mean_loss(model, objective, batches, seed=options.seed)
    return {"loss": loss, "perplexity": perplexity(loss),
            "tokens": sum(objective.tokens_in(b) for b in batches), "data": source, "split": split,
            "checkpoint": f"the base model of {directory}" if base else str(directory)}


def _training_options(directory: Path) -> TrainConfig:
    """The options a run trained with (checked field by field, naming trainer_state.json), or the defaults for
    a checkpoint without training state."""
    saved = read_trainer_state_json(directory, whole=False).get("train_config")
    return TrainConfig() if saved is None else TrainConfig.from_dict(saved, source=directory / STATE_JSON)


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
    sacrebleu = require("sacrebleu", "BLEU")
    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses but {len(references)} reference lists")
    most = max((len(r) for r in references), default=1)
    streams = [[refs[k] if k < len(refs) else None for refs in references] for k in range(most)]
    bleu = sacrebleu.metrics.BLEU()
    score = bleu.corpus_score(list(hypotheses), streams)
    chrf = sacrebleu.metrics.CHRF().corpus_score(list(hypotheses), streams)
    return score.score, chrf.score, str(bleu.get_signature())


def evaluate_bleu(model: nn.Module, tokenizer: Tokenizer, pairs: Sequence[Pair], *, beam: int = 4,
                  alpha: float = 0.6, limit: int | None = None, batch_size: int = 64,
                  instruction: str | None = None) -> BleuResult:
    """Translate each distinct source of ``pairs`` and score corpus BLEU/chrF against all its references
    (``instruction``: a chat model's request, see :func:`qkv.recipes.translation.translate`)."""
    require("sacrebleu", "BLEU")  # before translating, not after
    sources, references = references_by_source(pairs)
    if limit is not None:
        sources, references = sources[:limit], references[:limit]
    start = time.perf_counter()
    hypotheses = translate(model, tokenizer, sources, beam=beam, alpha=alpha, batch_size=batch_size,
                           instruction=instruction)
    seconds = time.perf_counter() - start
    bleu, chrf, signature = corpus_scores(hypotheses, references)
    return BleuResult(bleu, chrf, signature, sources, references, hypotheses, beam, seconds)


def bleu_report(checkpoint: str | Path, *, beams: Sequence[int] = (1, 4), alpha: float = 0.6,
                limit: int | None = None, samples: int = 10, report: str | Path | None = None,
                average: int | None = None, print_fn=None, quantize: str | None = None,
                data: str | Path | None = None, instruction: str | None = None, dtype: Any = None,
                batch_size: int = 64) -> list[BleuResult]:
    """Score a translation checkpoint on its held-out test split, once per beam size; print the scores and
    ``samples`` example translations (source, output, references). ``report`` also writes them as JSON.
    ``average`` scores the average of the run directory's newest ``average`` checkpoints instead; ``quantize``
    ("int8" | "int4") translates with its linear layers quantized; ``dtype`` casts the model.

    A chat model (a decoder: a fine-tuned run, a Hugging Face directory, a GGUF file) translates by
    ``instruction`` (with ``{source}``) the test split of ``data``, a parallel file split as the translation
    recipe splits it (2,000 test sentences, seed 1234), so its BLEU stands beside a from-scratch run's on the
    same sentences. Raises ValueError when a decoder comes without ``data`` or ``instruction``."""
    require("sacrebleu", "BLEU")  # before loading and translating, not after
    say = print_fn or say_once
    if average:
        model, tokenizer, steps = average_checkpoints(checkpoint, average)
        say(f"averaging {len(steps)} checkpoints: {', '.join(p.name for p in steps)}")
        if quantize is not None:  # as qkv.load does: quantized from the weights as averaged, then the cast
            quantize_model(model, quantize)
        if dtype is not None:
            model = model.to(dtype)
    else:
        model, tokenizer = load(checkpoint, quantize=quantize, dtype=dtype)
    kind = model_type_of(model)
    if kind == "decoder":
        if data is None or instruction is None:
            raise ValueError(f"{checkpoint} holds a decoder: BLEU of a chat model needs the parallel file whose "
                             "test split it translates and the instruction to ask with (--data PAIRS "
                             "--instruction 'Translate to French: {source}')")
        corpus = read_parallel(data)
        test = split_by_source(corpus.pairs).test
        run = {"data": str(data), "split_seed": 1234, "data_sha256": corpus.sha256}
    elif kind != "seq2seq":
        raise TypeError(f"{checkpoint} holds a {type(model).__name__}; BLEU needs an encoder-decoder Transformer "
                        "trained with `qkv train vaswani-small --data PARALLEL_FILE`, or a chat model with "
                        "--data PAIRS --instruction TEXT")
    else:
        if instruction is not None:
            raise ValueError(f"{checkpoint} is an encoder-decoder Transformer, which reads the source alone: "
                             "leave out the instruction")
        test, run = held_out_test_split(checkpoint, data)
    results = []
    for beam in beams:
        result = evaluate_bleu(model, tokenizer, test, beam=beam, alpha=alpha, limit=limit,
                               instruction=instruction, batch_size=batch_size)
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
