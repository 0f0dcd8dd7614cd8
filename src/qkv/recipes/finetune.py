"""The fine-tuning recipe: a pretrained model (``--init-from``), fully or through LoRA adapters (peft), on a text
(next-token loss) or on chat conversations (loss on the assistant replies only); and ``export_run``, a fine-tuned
run as a standalone qkv checkpoint or Hugging Face directory.

- **The base** is any model ``qkv.load`` reads: a qkv checkpoint or run, a Hugging Face GPT-2 or LLaMA-style
  directory, a ``.gguf`` file (dequantized to fp32). Its config, weights and tokenizer (roles and chat template)
  are the run's; the run records it by name and sha256 (``qkv.loading.describe_base``: a file an installed package
  holds by the package's name and version, never by a virtual environment's path).
- **Full fine-tuning** trains every weight and saves whole checkpoints. **LoRA** (``--lora-r``) wraps the chosen
  layers with peft's LoRA, W x + (α / r) B A x, trains A and B alone and saves them alone (peft's
  ``adapter_model.safetensors`` + ``adapter_config.json``). ``q``, ``k``, ``v`` adapt parts of [W_Q | W_K | W_V]:
  the model is rebuilt in the ``q_k_v`` layout (three modules, the same function), as the LoRA paper's W_Q, W_V
  adapters need. A tied output layer *is* the token embedding: an adapter there is refused (merging it would
  change the embedding too, peft#2018); adapt it in an untied model, or fine-tune fully.
- **Chat data** (a ``.jsonl`` of ``{"messages": [...]}``): each conversation rendered whole with the model's template,
  the targets every assistant reply through its end-of-turn token (``qkv.data.chat``), batches of similar
  length, the loss summed over targets and divided by the optimizer step's count of them (``qkv.training``).
- **Export** (``qkv export``): adapters merged in fp32, in eval mode, without gradients, then cast; written as a
  qkv checkpoint or through ``save_llama`` / ``save_gpt2``, tied as the base was; or, unmerged, the adapters under
  Hugging Face's names beside the base in Hugging Face's format.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from ..chat_template import ChatTemplate
from ..checkpoint import save_checkpoint, write_directory
from ..data import (
    ChatBatches,
    WindowBatches,
    is_chat_file,
    load_tokens,
    read_chats,
    read_corpus,
    render_chats,
    split_chats,
)
from ..extras import require
from ..interop import save_gpt2, save_llama
from ..loading import describe_base, is_adapter_run, load, load_adapter_run, save_adapter_checkpoint
from ..models import build_model, unwrap
from ..tokenizers import Tokenizer
from ..training import NextToken, Objective, TrainConfig, Trainer, TrainResult, say_once
from .language_model import LANGUAGE_MODEL
from .runs import (
    Option,
    Recipe,
    RunOptions,
    absolute_source,
    check_data_unchanged,
    claim_new_run,
    data_size,
    load_saved_model,
    recorded_data,
)

__all__ = ["FINETUNE", "finetune", "LORA_TARGETS", "DEFAULT_LORA_TARGETS", "lora_settings", "apply_lora",
           "export_run", "merged_model", "hf_adapter", "DEFAULT_CONTEXT"]

# --lora-targets names → the module names peft matches (a suffix after a dot)
LORA_TARGETS = {"qkv": "self_attn.qkv", "q": "self_attn.q", "k": "self_attn.k", "v": "self_attn.v",
                "out": "self_attn.out", "o": "self_attn.out", "w1": "ffn.w1", "w2": "ffn.w2", "lm_head": "lm_head"}
DEFAULT_LORA_TARGETS = "qkv,out"  # the attention projections: [W_Q | W_K | W_V] and W_O
DEFAULT_CONTEXT = 1024  # tokens per window or conversation when --context is not given (at most max_seq_len)
ALLOWED_MODEL_OVERRIDES = ("dropout", "attention_dropout")

OPTIONS = (
    Option("init_from", str, "fine-tune this model: a qkv checkpoint or run, a Hugging Face GPT-2 or LLaMA-style "
                             "directory, or a .gguf file (its weights, config and tokenizer with its chat template); "
                             "--data is a text (next-token loss) or a chat .jsonl, one {\"messages\": [...]} a line "
                             "(loss on the assistant replies only)"),
    Option("lora_r", int, "train LoRA adapters of rank r (peft) instead of every weight; only the adapters are "
                          "saved, with the base model's path and sha256"),
    Option("lora_alpha", float, "LoRA's alpha: the update is (alpha / r) B A (default 2r)"),
    Option("lora_dropout", float, "dropout on the LoRA branch's input (default 0)"),
    Option("lora_targets", str, f"layers to adapt, comma-separated: qkv ([W_Q|W_K|W_V] as one), q, k, v (parts, "
                                f"as the LoRA paper's q,v), out (W_O), w1, w2 (feed-forward), lm_head (an untied "
                                f"output layer only); default {DEFAULT_LORA_TARGETS}"),
)
LORA_KEYS = ("lora_r", "lora_alpha", "lora_dropout", "lora_targets")


# -- LoRA ---------------------------------------------------------------------------------------------------------
def lora_settings(r: int | None, alpha: float | None = None, dropout: float | None = None,
                  targets: str | None = None) -> dict | None:
    """The LoRA a run trains (None: full fine-tuning), checked: {"r", "alpha", "dropout", "targets"} with the
    targets as ``LORA_TARGETS`` names. Options without ``r`` are refused in one line."""
    if r is None:
        given = [f"--{name}" for name, value in (("lora-alpha", alpha), ("lora-dropout", dropout),
                                                 ("lora-targets", targets)) if value is not None]
        if given:
            raise ValueError(f"{', '.join(given)} set LoRA's adapters, but no --lora-r was given: add --lora-r N "
                             "(e.g. 8) to train adapters, or drop them to fine-tune every weight")
        return None
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise ValueError(f"--lora-r {r} must be a positive integer (the adapters' rank, e.g. 8)")
    alpha = float(2 * r if alpha is None else alpha)
    if not alpha > 0:
        raise ValueError(f"--lora-alpha {alpha:g} must be positive (the update is scaled by alpha / r)")
    dropout = 0.0 if dropout is None else float(dropout)
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"--lora-dropout {dropout:g} must lie in [0, 1)")
    names = [t.strip() for t in (targets or DEFAULT_LORA_TARGETS).split(",") if t.strip()]
    unknown = [t for t in names if t not in LORA_TARGETS]
    if unknown or not names:
        raise ValueError(f"--lora-targets {targets!r}: {', '.join(unknown) or 'nothing'} is not a layer to adapt; "
                         f"choose from {', '.join(LORA_TARGETS)}")
    if "qkv" in names and {"q", "k", "v"} & set(names):
        raise ValueError("--lora-targets: qkv adapts [W_Q | W_K | W_V] as one module and q, k, v adapt its parts; "
                         "choose one of the two")
    names = list(dict.fromkeys("out" if t == "o" else t for t in names))
    return {"r": r, "alpha": alpha, "dropout": dropout, "targets": names}


def _in_layout(model: nn.Module, fused: bool) -> nn.Module:
    """``model`` with its self-attention stored as one [W_Q | W_K | W_V] module (``fused``) or as q, k, v: the same
    function and weights, rebuilt from its config (``fused_qkv``) when the layout differs."""
    if model.config.fused_qkv == fused:
        return model
    rebuilt = build_model(model.config.replace(fused_qkv=fused), model.model_type)
    rebuilt.load_state_dict(model.state_dict())  # the layouts load each other's weights, regrouped by name
    return rebuilt.to(next(model.parameters()).device).train(model.training)


def apply_lora(model: nn.Module, settings: dict) -> nn.Module:
    """``model`` (a qkv ``DecoderLM``) with peft's LoRA on ``settings["targets"]``: a ``PeftModel`` whose adapters
    alone train. Parts of [W_Q | W_K | W_V] (q, k, v) rebuild the model in the ``q_k_v`` layout first; an adapter
    on a tied output layer is refused."""
    peft = require("peft", "LoRA fine-tuning")
    targets = settings["targets"]
    if "lm_head" in targets and model.config.tie_embeddings:
        raise ValueError("--lora-targets lm_head: this model ties its output layer to the token embedding "
                         "(tie_embeddings), so an adapter there would change the embedding too when merged "
                         "(peft#2018); drop lm_head from --lora-targets, or fine-tune every weight (no --lora-r)")
    model = _in_layout(model, fused=not {"q", "k", "v"} & set(targets))
    config = peft.LoraConfig(r=settings["r"], lora_alpha=settings["alpha"], lora_dropout=settings["dropout"],
                             target_modules=[LORA_TARGETS[t] for t in targets], bias="none")
    return peft.get_peft_model(model, config)


def _count(model: nn.Module) -> tuple[int, int]:
    params = {id(p): p for p in model.parameters()}.values()
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


# -- data ---------------------------------------------------------------------------------------------------------
def _context(model: nn.Module, config: TrainConfig) -> int:
    """Tokens per training window or conversation: --context, else the model's max_seq_len up to
    ``DEFAULT_CONTEXT``; never longer than max_seq_len."""
    max_len = unwrap(model).config.max_seq_len
    context = config.context if config.context is not None else min(max_len, DEFAULT_CONTEXT)
    if context > max_len:
        raise ValueError(f"--context {context} is longer than the model's max_seq_len={max_len}; lower --context")
    return context


def _read_data(data: str | Path | None):
    """→ (a ChatCorpus or a text Corpus, its absolute source, sha256, bytes)."""
    if data is None:
        raise ValueError("--init-from needs --data: a text file or folder (next-token loss) or a chat .jsonl "
                         "(one {\"messages\": [...]} a line)")
    if is_chat_file(data):
        chats = read_chats(data)
        return chats, chats.source, chats.sha256, chats.n_bytes
    corpus = read_corpus(data)
    return corpus, absolute_source(corpus.source), corpus.sha256, data_size(corpus.text)


def _sources(model: nn.Module, tok: Tokenizer, data, config: TrainConfig, say) -> tuple:
    """(training batches, validation batches, a one-line description) of a text or of chat conversations."""
    context = _context(model, config)
    if hasattr(data, "conversations"):
        template = ChatTemplate(tok)
        if template.note:
            say(f"note: {template.note}")
        train, val = split_chats(data.conversations, config.val_fraction, config.seed)
        train_ex, val_ex = render_chats(train, template, context + 1), render_chats(val, template, context + 1)
        say(f"chat data: {train_ex.report('training', context + 1)}; {val_ex.report('validation', context + 1)}")
        pad = tok.pad_id if tok.pad_id is not None else 0
        return (ChatBatches(train_ex.examples, config.batch_size, seed=config.seed, pad_id=pad),
                ChatBatches(val_ex.examples, config.batch_size, seed=config.seed, pad_id=pad, name="validation"),
                f"{len(train_ex.examples):,} conversations (loss on the assistant replies)")
    splits = load_tokens(data, tok, val_fraction=config.val_fraction)
    window = context + NextToken.window_extra
    return (WindowBatches(splits.train, window, config.batch_size, seed=config.seed, name="train"),
            WindowBatches(splits.val, window, config.batch_size, seed=config.seed, name="validation"),
            f"{len(splits.train):,} training tokens")


def _trainer(model, tok: Tokenizer, data, config: TrainConfig, out_dir, run_info: dict, say) -> tuple[Trainer, str]:
    train, val, what = _sources(model, tok, data, config, say)
    writer = functools.partial(save_adapter_checkpoint, base=run_info["base"]) if run_info.get("lora") else None
    trainer = Trainer(model, tok, train, val, config, out_dir, objective=NextToken(tok, config), run_info=run_info,
                      print_fn=say, checkpoint_writer=writer)
    return trainer, what


# -- the recipe -----------------------------------------------------------------------------------------------------
def finetune(init_from: str | Path, data: str | Path | None = None, config: TrainConfig | None = None, *,
             out_dir: str | Path = "runs/finetune", lora_r: int | None = None, lora_alpha: float | None = None,
             lora_dropout: float | None = None, lora_targets: str | None = None,
             model_overrides: dict | None = None, overwrite: bool = False,
             print_fn: Callable[[str], None] | None = None) -> TrainResult:
    """Fine-tune the model at ``init_from`` on ``data`` (a text, or a chat ``.jsonl``), fully or, with ``lora_r``,
    through LoRA adapters; checkpoints go to ``out_dir`` (see the module). ``model_overrides``: dropout and
    attention_dropout only (the model is the base's)."""
    say = print_fn or say_once
    config = config or TrainConfig()
    settings = lora_settings(lora_r, lora_alpha, lora_dropout, lora_targets)
    overrides = dict(model_overrides or {})
    fixed = sorted(set(overrides) - set(ALLOWED_MODEL_OVERRIDES))
    if fixed:
        flags = ", ".join("--" + k.replace("_", "-") for k in fixed)
        raise ValueError(f"--init-from trains the model as it is; {flags}"
                         f" cannot change it (only {', '.join(ALLOWED_MODEL_OVERRIDES)} can): drop them")
    init_from = Path(init_from)
    if not init_from.exists():
        raise FileNotFoundError(f"--init-from {init_from} does not exist; pass a qkv checkpoint or run, a Hugging "
                                "Face GPT-2 or LLaMA directory, or a .gguf file")
    corpus, source, sha256, n_bytes = _read_data(data)  # before the run directory is claimed: a bad file writes nothing
    with claim_new_run(out_dir, overwrite=overwrite):
        base = describe_base(init_from)
        model, tok = load(init_from)
        if tok is None:
            raise ValueError(f"{init_from} has no tokenizer (tokenizer.json); fine-tuning needs the model's own "
                             "tokenizer: add it to the directory")
        if hasattr(model, "peft_config"):
            raise ValueError(f"{init_from} is a LoRA run; start from its merged model: qkv export {init_from} "
                             "--merge --format qkv --out DIR, then --init-from DIR")
        if unwrap(model).model_type != "decoder":
            raise ValueError(f"{init_from} holds a {unwrap(model).model_type} model; fine-tuning trains decoder-only "
                             "language models (a DecoderLM: GPT-2, LLaMA, SmolLM2, qkv train's decoders)")
        if overrides:
            rebuilt = build_model(model.config.replace(**overrides), "decoder")
            rebuilt.load_state_dict(model.state_dict())
            model = rebuilt
        model.train()
        torch.manual_seed(config.seed)
        if settings is not None:
            model = apply_lora(model, settings)
        run_info = {"recipe": FINETUNE.name, "data": source, "data_sha256": sha256, "data_bytes": n_bytes,
                    "data_kind": "chat" if hasattr(corpus, "conversations") else "text", "tokenizer": "base",
                    "model_type": "decoder", "base": base, "lora": settings}
        trainer, what = _trainer(model, tok, corpus, config, out_dir, run_info, say)
        trainable, total = _count(model)
        how = (f"LoRA r={settings['r']} alpha={settings['alpha']:g} on {','.join(settings['targets'])}: "
               f"{trainable:,} of {total:,} parameters train" if settings else f"all {total:,} parameters train")
        say(f"fine-tuning {base['name']} (sha256 {base['sha256'][:12]}) on {source}: {what}; {how}; on "
            f"{trainer.device}")
        return trainer.fit()


def _start(options: RunOptions) -> TrainResult:
    """``qkv train --init-from PATH`` → a new fine-tuning run."""
    run = options.run
    if not run.get("init_from"):
        given = ", ".join(f"--{k.replace('_', '-')}" for k in LORA_KEYS if run.get(k) is not None)
        raise ValueError(f"{given} trains adapters on a pretrained model: add --init-from PATH (the model to adapt)")
    refused = [f"--{k.replace('_', '-')}" for k in ("preset", "tokenizer", "model_type") if k in run]
    if refused:
        raise ValueError(f"--init-from brings its own model and tokenizer; drop {', '.join(refused)}")
    out = run.get("out") or f"runs/finetune-{Path(run['init_from']).stem}"
    return finetune(run["init_from"], run.get("data"), TrainConfig(**options.train), out_dir=out,
                    lora_r=run.get("lora_r"), lora_alpha=run.get("lora_alpha"), lora_dropout=run.get("lora_dropout"),
                    lora_targets=run.get("lora_targets"), model_overrides=options.model,
                    overwrite=options.overwrite)


def _load_run(directory: Path) -> tuple[nn.Module, Tokenizer]:
    """A saved fine-tuning run's model, to resume it: the whole model, or the base with its adapters trainable."""
    if is_adapter_run(directory):
        model, tok = load_adapter_run(directory, trainable=True)
        return model, tok
    return load_saved_model(directory)


def _data_of(run: dict, data, directory: Path, fix: str):
    corpus, source, sha256, n_bytes = _read_data(recorded_data(run, data, directory, fix))
    return corpus, source, sha256, n_bytes


def _trainer_for_run(model, tokenizer: Tokenizer, run: dict, config: TrainConfig, *, data, out_dir, say,
                     directory: Path) -> Trainer:
    corpus, source, sha256, n_bytes = _data_of(run, data, directory, "pass --data with the same file to resume")
    check_data_unchanged(sha256, n_bytes, source, run, "resuming needs the data it trained on: put that file back "
                                                       "(or pass --data with a copy of it), or start a new run")
    trainable, _ = _count(model)
    if run.get("lora") and not trainable:  # peft#282: adapters loaded for inference train nothing
        raise RuntimeError("the resumed LoRA adapters have no trainable parameter; load them with trainable=True")
    return _trainer(model, tokenizer, corpus, config, out_dir, run, say)[0]


def _evaluation_batches(model, tokenizer: Tokenizer, objective: Objective, run: dict, directory: Path, *, data,
                        split: str, batch_size: int, context: int | None, max_batches: int) -> tuple[list, str]:
    """A text run: as the language model's; a chat run: its validation conversations (``split="val"``) or all of
    them, scored on the assistant replies."""
    if run.get("data_kind") != "chat" and not is_chat_file(data):
        return LANGUAGE_MODEL.evaluation_batches(model, tokenizer, objective, run, directory, data=data, split=split,
                                                 batch_size=batch_size, context=context, max_batches=max_batches)
    corpus, source, sha256, n_bytes = _data_of(run, data, directory, "pass --data with the conversations")
    if data is None:
        check_data_unchanged(sha256, n_bytes, source, run, f"its validation conversations are not the ones the run "
                                                           f"held out; pass --data {source} to evaluate it on purpose")
    saved = _saved_options(directory)
    # Conversations cropped as the run cropped them (its --context), unless --context says otherwise.
    options = TrainConfig(context=context if context is not None else saved.context, batch_size=batch_size)
    conversations = corpus.conversations
    if split == "val":
        conversations = split_chats(conversations, saved.val_fraction, saved.seed)[1]
    examples = render_chats(conversations, ChatTemplate(tokenizer), _context(model, options) + 1).examples
    return ChatBatches(examples, batch_size, name="evaluation").fixed(max_batches), source


def _saved_options(directory: Path) -> TrainConfig:
    from ..checkpoint import read_trainer_state_json

    saved = read_trainer_state_json(directory).get("train_config") or {}
    return TrainConfig.from_dict(saved, source=directory) if saved else TrainConfig()


def _chosen(options: RunOptions) -> bool:
    return bool(options.run.get("init_from")) or any(options.run.get(k) is not None for k in LORA_KEYS)


FINETUNE = Recipe("finetune", "decoder", train=finetune, start=_start, model_config=LANGUAGE_MODEL.model_config,
                  trainer_for_run=_trainer_for_run, evaluation_batches=_evaluation_batches, load_run=_load_run,
                  options=OPTIONS, options_title="fine-tuning (--init-from PATH; LoRA with --lora-r)",
                  chooses=_chosen)


# -- export ---------------------------------------------------------------------------------------------------------
def merged_model(model: nn.Module) -> nn.Module:
    """A plain qkv model from a run's model: adapters merged into the weights in fp32, in eval mode and without
    gradients (W + (α / r) B A, computed once), self-attention back in the one-module [W_Q | W_K | W_V] layout."""
    model = model.float().eval()
    with torch.no_grad():
        if hasattr(model, "merge_and_unload"):
            model = model.merge_and_unload()
        model = unwrap(model)
        return _in_layout(model, fused=True).eval()


def _hf_writer(model: nn.Module) -> Callable:
    """save_llama for a RoPE model (LLaMA-style), else save_gpt2."""
    return save_llama if unwrap(model).config.positional == "rope" else save_gpt2


def hf_adapter(model: nn.Module) -> tuple[dict, dict[str, torch.Tensor]]:
    """A qkv peft model's adapters under Hugging Face's names → (LoraConfig arguments, peft's saved tensors) for
    ``LlamaForCausalLM`` or ``GPT2LMHeadModel``. A LoRA on the fused [W_Q | W_K | W_V] becomes q_proj, k_proj and
    v_proj adapters sharing A, B split by rows (exactly the same update); LLaMA's [W_gate | W_up] likewise."""
    peft = require("peft", "exporting LoRA adapters")
    core = unwrap(model)
    config, lora = core.config, model.peft_config["default"]
    llama = config.positional == "rope"
    kv = (config.n_kv_heads or config.n_heads) * config.d_k
    if llama:
        names = {"self_attn.qkv": [("self_attn.q_proj", config.d_model), ("self_attn.k_proj", kv),
                                   ("self_attn.v_proj", kv)],
                 "self_attn.q": [("self_attn.q_proj", None)], "self_attn.k": [("self_attn.k_proj", None)],
                 "self_attn.v": [("self_attn.v_proj", None)], "self_attn.out": [("self_attn.o_proj", None)],
                 "ffn.w1": [("mlp.gate_proj", config.d_ff), ("mlp.up_proj", config.d_ff)],
                 "ffn.w2": [("mlp.down_proj", None)]}
        prefix = "model.layers"
    else:
        names = {"self_attn.qkv": [("attn.c_attn", None)], "self_attn.out": [("attn.c_proj", None)],
                 "ffn.w1": [("mlp.c_fc", None)], "ffn.w2": [("mlp.c_proj", None)]}
        prefix = "transformer.h"
    tensors: dict[str, torch.Tensor] = {}
    targets: set[str] = set()
    for key, value in peft.get_peft_model_state_dict(model, save_embedding_layers=False).items():
        path, _, end = key.removeprefix("base_model.model.").partition(".lora_")  # layers.layers.0.self_attn.qkv
        if path == "lm_head":
            parts, hf_path = [("lm_head", None)], ""
        else:
            layer, _, module = path.removeprefix("layers.layers.").partition(".")
            if module not in names:
                raise ValueError(f"a LoRA on {module} (--lora-targets q, k or v) has no Hugging Face GPT-2 name: "
                                 "GPT-2's c_attn is one module; export with --merge, or train with --lora-targets "
                                 "qkv")
            parts, hf_path = names[module], f"{prefix}.{layer}."
        matrix = "lora_" + end  # lora_A.weight or lora_B.weight
        rows = [n for _, n in parts]
        pieces = [value] * len(parts) if matrix.startswith("lora_A") or rows == [None] else value.split(rows)
        for (name, _), piece in zip(parts, pieces, strict=True):
            targets.add(name)
            tensors[f"base_model.model.{hf_path}{name}.{matrix}"] = piece.detach().float().contiguous().clone()
    arguments = {"r": lora.r, "lora_alpha": lora.lora_alpha, "lora_dropout": lora.lora_dropout,
                 "target_modules": sorted(targets), "bias": "none", "task_type": "CAUSAL_LM",
                 "fan_in_fan_out": not llama}  # GPT-2's Conv1D stores its weights transposed
    return arguments, tensors


def _check_export_target(run: Path, out: Path, overwrite: bool) -> None:
    """Refuse an ``out`` that would destroy the run being exported, or anything else already there."""
    source, target = run.resolve(), out.resolve()
    if target == source or target in source.parents:
        raise ValueError(f"--out {out} is or holds the run being exported ({run}): writing there would replace it; "
                         "choose a new directory")
    if target.exists() and (not target.is_dir() or any(target.iterdir())) and not overwrite:
        raise ValueError(f"--out {out} already exists and is not empty; choose a new directory, or pass --overwrite "
                         "to replace it")


def export_run(run: str | Path, out: str | Path, *, merge: bool = False, format: str = "qkv",
               dtype: str = "fp32", overwrite: bool = False) -> Path:
    """A fine-tuned run (or any model ``qkv.load`` reads) as a standalone directory ``out`` (see the module):

    - ``merge`` (or a run without adapters): one model, fp32-merged then cast to ``dtype`` ("fp32" | "bf16");
      ``format="qkv"`` a qkv checkpoint, ``"hf"`` a Hugging Face LLaMA (RoPE models) or GPT-2 directory;
    - adapters unmerged: ``"qkv"`` the adapters with their base record (``qkv.load`` puts them back on the base);
      ``"hf"`` ``out/base`` (the base, Hugging Face format) and ``out/adapter`` (peft's files under Hugging Face's
      names, ``base_model_name_or_path`` = ``out/base``).

    Every directory is written atomically with a manifest of its files' sha256 (``write_directory``). ``out`` must
    not exist or be empty unless ``overwrite`` (then it is replaced), and it may never be, or hold, ``run`` itself.
    Raises ValueError for either, naming the fix."""
    _check_export_target(Path(run), Path(out), overwrite)
    if format not in ("qkv", "hf"):
        raise ValueError(f"--format {format} is not one of qkv, hf")
    if dtype not in ("fp32", "bf16"):
        raise ValueError(f"--dtype {dtype} is not one of fp32, bf16")
    out = Path(out)
    model, tok = load(run)
    adapted = hasattr(model, "peft_config")
    cast = torch.bfloat16 if dtype == "bf16" else torch.float32
    if merge or not adapted:
        plain = merged_model(model).to(cast)
        if format == "qkv":
            return save_checkpoint(out, plain, tok)
        with write_directory(out) as tmp:
            _hf_writer(plain)(plain, tmp, tok)
        return out
    if format == "qkv":
        from ..checkpoint import resolve_checkpoint
        from ..loading import ADAPTER_BASE

        base = __import__("json").loads((resolve_checkpoint(run) / ADAPTER_BASE).read_text())
        return save_adapter_checkpoint(out, model.to(cast), tok, base=base)
    peft = require("peft", "exporting LoRA adapters")
    arguments, tensors = hf_adapter(model)
    base_model = _in_layout(unwrap(model.unload()).float().eval(), fused=True).to(cast)
    from safetensors.torch import save

    with write_directory(out) as tmp:
        _hf_writer(base_model)(base_model, tmp / "base", tok)
        (tmp / "adapter").mkdir()
        peft.LoraConfig(**arguments, base_model_name_or_path=str((out / "base").resolve())).save_pretrained(
            str(tmp / "adapter"))
        (tmp / "adapter" / "adapter_model.safetensors").write_bytes(
            save({k: v.to(cast) for k, v in tensors.items()}))
    return out
