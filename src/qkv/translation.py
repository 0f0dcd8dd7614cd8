"""The old home of translation's names, kept so that existing imports work (each now lives in its layer).

Reading parallel files, the split, token and task batches are in :mod:`qkv.data`; ``Seq2SeqObjective`` in
:mod:`qkv.training`; the shared vocabulary, the recipe and ``translate`` in :mod:`qkv.recipes.translation`; BLEU
in :mod:`qkv.evaluation`; checkpoint averaging in :mod:`qkv.checkpoint`.
``from qkv.translation import read_parallel, train_translation, translate, evaluate_bleu`` keeps working; new
code imports from those modules.
"""

from __future__ import annotations

from pathlib import Path

from .checkpoint import average_checkpoints, claim_run_directory, run_to_resume
from .data.parallel import (
    Pair,
    ParallelCorpus,
    Seq2SeqBatch,
    Splits,
    TaskBatches,
    TokenBatches,
    encode_pairs,
    pad_batch,
    read_parallel,
    references_by_source,
    split_by_source,
)
from .evaluation import BleuResult, bleu_report, corpus_scores, evaluate_bleu
from .losses import IGNORE_INDEX
from .models import Transformer
from .recipes.runs import continue_run
from .recipes.translation import (
    BOS_TOKEN,
    EOS_TOKEN,
    PAD_TOKEN,
    SPECIAL_TOKENS,
    TRANSLATION,
    TranslationData,
    held_out_test_split,
    prepare,
    train_shared_bpe,
    train_translation,
    translate,
    translation_train_config,
    validation_pair_batches,
)
from .tasks import EOS, TASKS
from .tokenizers import Tokenizer
from .training import OBJECTIVES, Seq2SeqObjective, TrainConfig, TrainResult, say_once

__all__ = ["PAD_TOKEN", "BOS_TOKEN", "EOS_TOKEN", "ParallelCorpus", "read_parallel", "Splits", "split_by_source",
           "references_by_source", "train_shared_bpe", "encode_pairs", "Seq2SeqBatch", "pad_batch",
           "TokenBatches", "Seq2SeqObjective", "translate", "corpus_scores", "evaluate_bleu", "BleuResult",
           "TranslationData", "prepare", "translation_train_config", "train_translation", "resume_translation",
           "held_out_test_split", "validation_pair_batches", "bleu_report", "average_checkpoints",
           # public before the move too, though not listed then
           "EOS", "IGNORE_INDEX", "OBJECTIVES", "Pair", "SPECIAL_TOKENS", "TASKS", "TaskBatches"]


def resume_translation(model: Transformer, tokenizer: Tokenizer, state: dict, directory: Path, config: TrainConfig,
                       *, data: str | Path | None = None, out_dir: str | Path | None = None,
                       print_fn=None) -> TrainResult:
    """Continue a translation run from its loaded checkpoint: the same split, vocabulary and batches
    (``qkv.recipes.resume`` does this for a path, for every recipe). Its run directory (``out_dir``, default the
    checkpoint's) is claimed as ``resume`` claims it."""
    run_dir = run_to_resume(directory, out_dir)
    with claim_run_directory(run_dir, resuming=True):
        return continue_run(TRANSLATION, model, tokenizer, state, directory, config, data=data, out_dir=run_dir,
                            say=print_fn or say_once)
