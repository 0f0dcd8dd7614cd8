"""The translation recipe: the encoder-decoder Transformer of "Attention Is All You Need" at laptop scale.

A parallel file → a split by source sentence (:mod:`qkv.data.parallel`) → one shared byte-level BPE vocabulary
trained on the training split → length-bucketed token batches → a ``Transformer`` trained with the paper's
settings (``translation_train_config``) → checkpoints that remember the split, so ``qkv eval --bleu`` scores the
held-out test sentences (:mod:`qkv.evaluation`). :func:`translate` decodes sentences greedily or with beam
search (:func:`qkv.generation.generate_seq2seq`); with a chat model (a decoder and an instruction such as
``"Translate to French: {source}"``) it asks for each translation in one user turn of the model's chat template.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..chat_template import ChatTemplate
from ..checkpoint import read_run_info, resolve_checkpoint
from ..config import ModelConfig
from ..data import (
    Pair,
    ParallelCorpus,
    Seq2SeqBatch,
    Splits,
    TokenBatches,
    encode_pairs,
    left_pad,
    read_parallel,
    right_pad,
    split_by_source,
)
from ..generation import generate, generate_seq2seq
from ..generation.stopping import until_stop_token
from ..models import Transformer, evaluating, model_type_of, unwrap
from ..tokenizers import BPE_VOCAB_SIZE, Tokenizer
from ..training import Objective, TrainConfig, Trainer, TrainResult, say_once
from .runs import (
    Option,
    Recipe,
    RunOptions,
    absolute_source,
    check_data_unchanged,
    claim_new_run,
    recorded_data,
    run_recipe,
)

__all__ = ["PAD_TOKEN", "BOS_TOKEN", "EOS_TOKEN", "SPECIAL_TOKENS", "train_shared_bpe", "TranslationData",
           "prepare", "translation_model_config", "translation_train_config", "train_translation",
           "held_out_test_split", "split_of_run", "validation_pair_batches", "translate", "TRANSLATION"]

PAD_TOKEN, BOS_TOKEN, EOS_TOKEN = "<pad>", "<bos>", "<eos>"
SPECIAL_TOKENS = [PAD_TOKEN, BOS_TOKEN, EOS_TOKEN]  # ids 0, 1, 2: the layout of qkv.tasks as well


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


def translation_model_config(preset: str, overrides: dict | None = None, *, tokenizer: str = "bpe") -> ModelConfig:
    """The model a new translation run trains: ``preset`` with ``overrides``; its vocabulary is one shared
    byte-level BPE (``vocab_size`` tokens): a preset's larger vocabulary is kept, a smaller one becomes
    ``BPE_VOCAB_SIZE`` (tiny-seq2seq's 32 cannot hold BPE's 256 bytes)."""
    overrides = dict(overrides or {})
    if tokenizer != "bpe":
        raise ValueError("translation uses a shared BPE vocabulary (its size: --vocab-size); drop --tokenizer")
    config = ModelConfig.preset(preset, **overrides)
    if "vocab_size" in overrides or config.vocab_size >= BPE_VOCAB_SIZE:
        return config
    return config.replace(vocab_size=BPE_VOCAB_SIZE)


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
    with claim_new_run(out_dir, overwrite=overwrite):
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
        run_info = {"recipe": "translation", "task": "translation", "data": absolute_source(data),
                    "data_sha256": prepared.corpus.sha256, "data_bytes": prepared.corpus.size,
                    "split_seed": split_seed, "n_test": n_test,
                    "n_valid": n_valid, "max_tokens": max_tokens, "model_type": "seq2seq", "tokenizer": "bpe"}
        trainer = _trainer(model, prepared, config, out_dir, run_info, say)
        say(f"training a {model.num_parameters():,}-parameter Transformer ({model_config.n_encoder_layers}+"
            f"{model_config.n_decoder_layers} layers, d_model {model_config.d_model}, "
            f"{model_config.norm_position}-LN) on {len(prepared.train):,} batches of <= {max_tokens} tokens per "
            f"side, shared BPE vocabulary {tok.vocab_size:,}")
        return trainer.fit()


def held_out_test_split(checkpoint: str | Path, data: str | Path | None = None) -> tuple[list[Pair], dict]:
    """The test pairs a translation checkpoint was held out from, rebuilt from the settings saved with it
    (``data``: another parallel file, split the same way)."""
    directory = resolve_checkpoint(checkpoint)
    run = read_run_info(directory)
    splits = split_of_run(run, directory, data)
    return splits.test, run


def split_of_run(run: dict, directory: Path, data: str | Path | None = None) -> Splits:
    """The train / validation / test split a translation run made, rebuilt from its saved settings (``data``:
    another parallel file, split the same way)."""
    if run_recipe(run) != "translation":
        raise ValueError(f"{directory} was not trained by the translation recipe (no split settings in its "
                         "trainer state); pass a checkpoint written by `qkv train --data PARALLEL_FILE`")
    source = recorded_data(run, data, directory, "its split cannot be rebuilt without it")
    corpus = read_parallel(source)
    if data is None:
        check_data_unchanged(corpus.sha256, corpus.size, str(source), run, "its split cannot be rebuilt; put the "
                             "file it trained on back, or pass --data with another parallel file to split the same "
                             "way on purpose")
    return split_by_source(corpus.pairs, n_test=run["n_test"], n_valid=run["n_valid"], seed=run["split_seed"])


def validation_pair_batches(run: dict, tokenizer: Tokenizer, max_seq_len: int, directory: Path, *,
                            data: str | Path | None = None, split: str = "val", max_batches: int = 10_000
                            ) -> tuple[list[Seq2SeqBatch], str]:
    """The batches ``qkv eval`` scores a translation run on → (batches, where the pairs came from).

    ``split="val"``: the run's validation pairs, batched as training batched them (``max_tokens`` per side);
    ``"all"``: every pair of the file. Pairs longer than ``max_seq_len`` are left out, as in training."""
    source = data if data is not None else run.get("data")
    if split == "val":
        pairs = split_of_run(run, directory, data).valid
    else:
        corpus = read_parallel(recorded_data(run, data, directory, "pass --data with the pairs to evaluate on"))
        if data is None and "data_sha256" in run:
            check_data_unchanged(corpus.sha256, corpus.size, str(source), run, f"pass --data {source} to evaluate "
                                 "this file on purpose, or put the original back")
        pairs = corpus.pairs
    src, tgt, _ = encode_pairs(tokenizer, pairs, max_seq_len)
    batches = TokenBatches(src, tgt, run.get("max_tokens", 2048), pad_id=tokenizer.pad_id, bos_id=tokenizer.bos_id,
                           name="validation" if split == "val" else "evaluation")
    return batches.fixed(max_batches), str(source)


@torch.no_grad()
def translate(model: nn.Module, tokenizer: Tokenizer, sentences: Sequence[str], *, beam: int = 4,
              alpha: float = 0.6, batch_size: int = 64, instruction: str | None = None,
              max_new_tokens: int = 128) -> list[str]:
    """Source sentences → detokenized translations, greedy (``beam=1``) or beam search (GNMT length penalty α).

    Sentences are translated in batches of similar length; the output keeps the input order. A source longer
    than the model's context is an error (never silently cut). An encoder-decoder Transformer reads each source
    and writes its target. A decoder (a chat model: SmolLM2-135M-Instruct, a fine-tuned run) needs
    ``instruction``, a text with ``{source}`` in it: each sentence becomes one user message rendered with the
    tokenizer's chat template (qkv's plain format without one), and the reply, up to ``max_new_tokens`` tokens
    (fewer where the context ends first) and cut at the template's end-of-turn token, is the translation
    (stripped of surrounding space).
    Raises ValueError for a bad ``beam``, ``batch_size`` or ``instruction``, TypeError for an encoder.
    """
    if beam < 1:
        raise ValueError(f"beam={beam} must be >= 1 (1 = greedy)")
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be >= 1 (sentences decoded together)")
    if model_type_of(model) == "decoder":
        return _translate_by_instruction(model, tokenizer, list(sentences), instruction, beam=beam, alpha=alpha,
                                         batch_size=batch_size, max_new_tokens=max_new_tokens)
    if model_type_of(model) != "seq2seq":  # a Transformer, or one wrapped by peft, torch.compile, DDP or FSDP
        raise TypeError(f"a {type(unwrap(model)).__name__} is not an encoder-decoder Transformer; translate with "
                        "a checkpoint trained by `qkv train vaswani-small --data PARALLEL_FILE`, or with a chat "
                        "model and an instruction")
    if instruction is not None:
        raise ValueError("instruction is for a decoder (a chat model); an encoder-decoder Transformer reads the "
                         "source sentence alone: leave it out")
    missing = [name for name in ("bos", "eos", "pad") if getattr(tokenizer, f"{name}_id") is None]
    if missing:
        raise ValueError(f"the tokenizer has no {' or '.join(missing)} token, which translation needs; use a "
                         "checkpoint trained on a parallel file (qkv train vaswani-small --data PAIRS)")
    sentences = list(sentences)
    if not sentences:
        return []
    limit = unwrap(model).config.max_seq_len
    eos = tokenizer.eos_id
    encoded = [ids + [eos] for ids in tokenizer.encode_batch(sentences)]
    for i, ids in enumerate(encoded):
        if len(ids) > limit:
            raise ValueError(f"sentence {i + 1} is {len(ids)} tokens long (with <eos>) and the model reads at most "
                             f"max_seq_len={limit}; split it into shorter sentences")
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
    out: list[str] = [""] * len(encoded)
    with evaluating(model):
        for start in range(0, len(order), batch_size):
            chunk = order[start:start + batch_size]
            src, mask = right_pad([encoded[i] for i in chunk], tokenizer.pad_id)
            targets = generate_seq2seq(model, src, mask, num_beams=beam, length_penalty=alpha,
                                       bos_token_id=tokenizer.bos_id, eos_token_id=eos,
                                       pad_token_id=tokenizer.pad_id)
            for i, ids in zip(chunk, targets, strict=True):
                out[i] = tokenizer.decode(ids)
    return out


def _translate_by_instruction(model: nn.Module, tokenizer: Tokenizer, sentences: list[str], instruction: str | None,
                              *, beam: int, alpha: float, batch_size: int, max_new_tokens: int) -> list[str]:
    """:func:`translate` with a decoder: one chat turn per sentence, batched left-padded by prompt length."""
    if instruction is None or "{source}" not in instruction:
        raise ValueError(f"a decoder translates by instruction: give one with {{source}} where the sentence goes "
                         f"(e.g. 'Translate to French: {{source}}'), got {instruction!r}")
    template = ChatTemplate(tokenizer)
    prompts = [template.render([{"role": "user", "content": instruction.replace("{source}", s)}],
                               add_generation_prompt=True).ids for s in sentences]
    pad = tokenizer.pad_id if tokenizer.pad_id is not None else 0
    stop = template.stop_ids
    limit = unwrap(model).config.max_seq_len
    for i, ids in enumerate(prompts):
        if len(ids) >= limit:
            raise ValueError(f"sentence {i + 1} asks in a prompt of {len(ids)} tokens and the model reads at most "
                             f"max_seq_len={limit}, leaving no room for the reply; split it, or shorten the "
                             "instruction")
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    out: list[str] = [""] * len(prompts)
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        ids, mask = left_pad([prompts[i] for i in chunk], pad)
        options = {"temperature": 0.0} if beam == 1 else {"num_beams": beam, "length_penalty": alpha}
        room = min(max_new_tokens, limit - ids.shape[1])  # a reply ends at the context: never a sliding window
        result = generate(model, ids, room, attention_mask=mask, stop_token_ids=stop, pad_token_id=pad,
                          **options)
        for i, row in zip(chunk, result[:, ids.shape[1]:].tolist(), strict=True):
            out[i] = tokenizer.decode(until_stop_token(row, stop)).strip()
    return out


def _trainer_for_run(model: Transformer, tokenizer: Tokenizer, run: dict, config: TrainConfig, *,
                     data: str | Path | None, out_dir: str | Path, say, directory: Path) -> Trainer:
    """A saved translation run's trainer: the same split, vocabulary and batches."""
    source = recorded_data(run, data, directory, "pass --data with the same file to resume")
    prepared = prepare(source, max_seq_len=model.config.max_seq_len, max_tokens=run["max_tokens"],
                       n_test=run["n_test"], n_valid=run["n_valid"], split_seed=run["split_seed"], seed=config.seed,
                       tokenizer=tokenizer)
    check_data_unchanged(prepared.corpus.sha256, prepared.corpus.size, str(source), run,
                         "resuming needs the pairs it trained on: put that file back (or pass --data with a copy of "
                         "it), or start a new run on this one")
    return _trainer(model, prepared, config, out_dir, run, say)


def _trainer(model: Transformer, prepared: TranslationData, config: TrainConfig, out_dir: str | Path,
             run_info: dict, say) -> Trainer:
    """The trainer of a translation run: its token batches, teacher-forced cross-entropy."""
    return Trainer(model, prepared.tokenizer, prepared.train, prepared.valid, config, out_dir, run_info=run_info,
                   print_fn=say)  # the objective: OBJECTIVES["seq2seq"], chosen by the trainer


def _evaluation_batches(model: Transformer, tokenizer: Tokenizer, objective: Objective, run: dict, directory: Path,
                        *, data: str | Path | None, split: str, batch_size: int, context: int | None,
                        max_batches: int) -> tuple[list[Seq2SeqBatch], str]:
    """What ``qkv eval`` scores a translation run on: whole sentence pairs (``validation_pair_batches``)."""
    if context is not None:
        raise ValueError(f"{directory} is a translation run, evaluated on whole sentence pairs; drop --context")
    return validation_pair_batches(run, tokenizer, model.config.max_seq_len, directory, data=data, split=split,
                                   max_batches=max_batches)


# qkv train's options of this recipe → train_translation's arguments
_ARGUMENTS = {"batch_tokens": "max_tokens", "test_size": "n_test", "valid_size": "n_valid", "split_seed": "split_seed"}


def _start(options: RunOptions) -> TrainResult:
    """``qkv train ENCODER_DECODER_PRESET --data PAIRS`` → a new run with the paper's training defaults."""
    if "data" not in options.run:
        raise ValueError(f"{options.preset} is an encoder-decoder: it trains on a parallel file; pass --data "
                         "data/tatoeba-fra-eng-2017-09-29.zip (or any source<TAB>target file)")
    model_config = translation_model_config(options.preset, options.model,
                                            tokenizer=options.run.get("tokenizer", "bpe"))
    return train_translation(options.run["data"], model_config, translation_train_config(**options.train),
                             out_dir=options.out_dir, overwrite=options.overwrite,
                             **{_ARGUMENTS[k]: v for k, v in options.run.items() if k in _ARGUMENTS})


TRANSLATION = Recipe(
    "translation", "seq2seq", train=train_translation, start=_start, model_config=translation_model_config,
    trainer_for_run=_trainer_for_run, evaluation_batches=_evaluation_batches,
    options_title="translation (an encoder-decoder preset; --data a source<TAB>target file or a Tatoeba zip)",
    options=(Option("batch_tokens", int, "tokens per batch on each side, padding included (default 2048)"),
             Option("test_size", int, "source sentences held out for BLEU (default 2000)"),
             Option("valid_size", int, "source sentences for the validation loss (default 1000)"),
             Option("split_seed", int, "seed of the split (default 1234)")))
