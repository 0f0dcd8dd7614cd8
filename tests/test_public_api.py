"""qkv's public API as the README presented it at commit 5430688, and the checkpoints that code wrote.

Both must keep working when modules move: a moved name is re-exported from its old home, a checkpoint written by
an earlier qkv loads, computes the same numbers and resumes the same way. The checkpoints under
``tests/fixtures/checkpoints/`` were written by ``make_checkpoints.py`` beside them with qkv at 5430688; nothing
here regenerates them.
"""

from __future__ import annotations

import importlib
import inspect
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import qkv

pytestmark = pytest.mark.usefixtures("one_thread")

FIXTURES = Path(__file__).parent / "fixtures" / "checkpoints"

# module → {name: the parameter names the README documents for it (all of them at 5430688; more may be added)}.
PUBLIC = {
    "qkv": {
        "load": ["path", "device", "dtype"],
        "ModelConfig": ["vocab_size", "d_model", "n_heads", "n_kv_heads", "d_ff", "n_encoder_layers",
                        "n_decoder_layers", "max_seq_len", "dropout", "attention_dropout", "activation", "norm",
                        "norm_position", "layer_norm_eps", "positional", "rope_base", "tie_embeddings",
                        "scale_embeddings", "bias", "final_norm", "embedding_norm", "n_token_types", "pad_token_id",
                        "bos_token_id", "eos_token_id", "init_std"],
        "DecoderLM": ["config"],
        "Encoder": ["config"],
        "Transformer": ["config"],
        "build_model": ["config", "model_type"],
        "MultiHeadAttention": ["d_model", "n_heads", "n_kv_heads", "bias", "dropout"],
        "KVCache": ["max_len"],
        "scaled_dot_product_attention": ["q", "k", "v", "mask", "causal", "scale", "dropout_p", "need_weights"],
    },
    "qkv.attention": {
        "scaled_dot_product_attention": ["q", "k", "v", "mask", "causal", "scale", "dropout_p", "need_weights"],
        "causal_mask": ["n_queries", "n_keys"],
        "padding_mask": ["attention_mask"],
        "to_torch_mha_mask": ["mask"],
        "MultiHeadAttention": ["d_model", "n_heads"],
        "KVCache": ["max_len"],
    },
    "qkv.positions": {
        "sinusoidal_encoding": ["n_positions", "d_model"],
        "SinusoidalPositions": ["max_positions", "d_model"],
        "LearnedPositions": ["max_positions", "d_model"],
        "NoPositions": ["max_positions"],
        "RotaryPositions": ["max_positions", "d_k", "base"],
        "ALiBiPositions": ["max_positions", "n_heads"],
    },
    "qkv.blocks": {
        "FeedForward": ["config"],
        "make_norm": ["config"],
        "RMSNorm": ["d_model", "eps"],
        "EncoderBlock": ["config"],
        "DecoderBlock": ["config"],
        "Stack": ["config"],
    },
    "qkv.models": {"Embeddings": ["config"], "Encoder": ["config"], "DecoderLM": ["config"],
                   "Transformer": ["config"]},
    "qkv.losses": {"cross_entropy": ["logits", "targets", "label_smoothing"]},
    "qkv.generate": {
        "GenerationConfig": ["max_new_tokens", "min_new_tokens", "temperature", "top_k", "top_p",
                             "repetition_penalty", "stop_token_ids", "stop_strings", "seed", "num_beams",
                             "length_penalty", "early_stopping", "use_cache", "bos_token_id", "pad_token_id"],
        "generate": ["model", "ids", "max_new_tokens", "config", "attention_mask", "tokenizer"],
        "stream": ["model", "ids", "max_new_tokens", "config", "attention_mask", "tokenizer"],
        "beam_search": ["model", "ids", "max_new_tokens", "config", "attention_mask", "return_scores"],
        "generate_text": ["model", "tokenizer", "prompts", "max_new_tokens", "config"],
        "stream_text": ["model", "tokenizer", "prompt", "max_new_tokens", "config"],
        "left_pad": ["sequences", "pad_id"],
        "generate_seq2seq": ["model", "src_ids", "src_attention_mask", "num_beams", "length_penalty",
                             "max_new_tokens", "bos_token_id", "eos_token_id"],
    },
    "qkv.train": {
        "TrainConfig": ["max_steps", "time_budget", "batch_size", "context", "grad_accum", "lr", "schedule",
                        "warmup_steps", "min_lr_ratio", "weight_decay", "beta1", "beta2", "adam_eps", "grad_clip",
                        "label_smoothing", "mlm_probability", "dtype", "device", "parallel", "eval_every",
                        "eval_seconds", "eval_batches", "final_eval_batches", "save_every", "keep_checkpoints",
                        "log_every", "seed", "val_fraction", "progress"],
        "train": ["model_config", "config", "data", "out_dir", "tokenizer", "model_type", "overwrite", "print_fn"],
        "resume": ["path", "overrides", "data", "out_dir", "print_fn"],
        "evaluate_checkpoint": ["checkpoint", "data", "split", "batch_size", "context", "max_batches"],
        "fastest_cpu_settings": ["model_config", "batch_size", "context", "threads", "dtypes", "seconds"],
    },
    "qkv.translation": {
        "read_parallel": ["path", "member"],
        "split_by_source": ["pairs", "n_test", "n_valid", "seed"],
        "train_shared_bpe": ["pairs", "vocab_size"],
        "TokenBatches": ["src", "tgt", "max_tokens", "seed", "pad_id", "bos_id", "name"],
        "TaskBatches": ["task", "size", "vocab_size", "batch_size", "seed"],
        "train_translation": ["data", "model_config", "config", "out_dir", "max_tokens", "n_test", "n_valid",
                              "split_seed", "overwrite", "print_fn"],
        "translate": ["model", "tokenizer", "sentences", "beam", "alpha", "batch_size"],
        "evaluate_bleu": ["model", "tokenizer", "pairs", "beam", "alpha", "limit", "batch_size"],
    },
    "qkv.tasks": {"copy_task": ["n", "length", "vocab_size", "generator"],
                  "reverse_task": ["n", "length", "vocab_size", "generator"],
                  "sort_task": ["n", "length", "vocab_size", "generator"],
                  "addition_task": ["n", "digits", "vocab_size", "generator"]},
    "qkv.explain": {"explain_head": ["model", "tokenizer", "text", "layer", "head", "token", "kind", "target"]},
    "qkv.viz": {
        "attention_maps": ["model", "tokenizer", "text", "target"],
        "attention_grid": ["maps", "query_labels", "key_labels", "title", "layers", "cmap"],
        "attention_heatmap": [], "attention_lines": [], "attention_panels": [], "head_colour": [],
        "save_figure": ["fig", "path", "dpi"],
        "AttentionMaps": [], "attention_kinds": [], "encode_input": [], "check_index": [], "KIND_TITLES": None,
        "positional_picture_data": [], "positions_figure": [], "encoding_for_kind": [],
    },
    "qkv.interop": {
        "is_hf_directory": ["path"], "load_hf": ["path", "device", "dtype"],
        "load_gpt2": ["directory", "dtype", "tokenizer"], "save_gpt2": ["model", "directory", "tokenizer"],
        "load_bert": ["directory", "dtype", "tokenizer"],
        "load_llama": ["directory", "dtype", "tokenizer"], "save_llama": ["model", "directory", "tokenizer"],
        "load_gguf": ["path", "dtype", "tokenizer"], "smollm2_gguf": [],
        "gpt2_tokenizer": [], "bert_tokenizer": [], "embed_texts": [], "mean_pool": [], "HF_LOADERS": None,
    },
}

# The commands and flags the README used at 5430688 (`qkv <command> ... --flag`).
COMMAND_FLAGS = {
    "info": [],
    "train": ["--data", "--out", "--max-steps", "--tokenizer", "--vocab-size", "--d-model", "--n-heads",
              "--n-decoder-layers", "--max-seq-len", "--time-budget", "--lr", "--config", "--resume", "--threads",
              "--dtype", "--grad-clip", "--grad-accum", "--label-smoothing", "--schedule", "--min-lr-ratio",
              "--save-every", "--keep-checkpoints", "--parallel"],
    "generate": ["--checkpoint", "--max-new-tokens", "--min-new-tokens", "--temperature", "--greedy", "--top-k",
                 "--top-p", "--repetition-penalty", "--stop", "--stop-id", "--seed", "--num-beams",
                 "--length-penalty", "--no-cache"],
    "eval": ["--checkpoint", "--bleu", "--report", "--average"],
    "translate": ["--checkpoint", "--beam"],
    "embed": ["--checkpoint", "--similarity", "--json"],
    "show attention": ["--checkpoint", "--layer", "--head", "--pick", "--lines", "--token", "--target", "--out",
                       "--dpi"],
    "show positions": ["--positional", "--checkpoint"],
    "explain": ["--checkpoint", "--layer", "--head", "--token"],
    "serve": ["--checkpoint"],
    "bench": ["--quick"],
    "bench training": ["--threads", "--compile", "--bf16", "--device"],
    "bench generate": ["--threads"],
}


def _params(obj) -> list[str]:
    """The named parameters of a function, or of a class's constructor."""
    params = inspect.signature(obj).parameters.values()
    return [p.name for p in params if p.kind is not inspect.Parameter.VAR_KEYWORD]


@pytest.mark.parametrize("module_name", sorted(PUBLIC))
def test_every_name_the_readme_imported_still_imports_with_its_documented_parameters(module_name):
    module = importlib.import_module(module_name)
    for name, documented in PUBLIC[module_name].items():
        assert hasattr(module, name), f"{module_name}.{name} is gone; re-export it from {module_name}"
        obj = getattr(module, name)
        if documented is None:  # a constant (a dict or tuple the README names)
            continue
        assert callable(obj), f"{module_name}.{name} is no longer callable"
        missing = [p for p in documented if p not in _params(obj)]
        assert not missing, f"{module_name}.{name} lost the parameter(s) {missing}"


def test_the_readme_import_lines_of_5430688_run():
    namespace: dict = {}
    exec("from qkv import ModelConfig, DecoderLM, Transformer, Encoder\n"
         "from qkv.generate import GenerationConfig, generate, stream, beam_search, generate_text, stream_text, "
         "left_pad\n"
         "from qkv.interop import save_gpt2, smollm2_gguf\n"
         "from qkv.viz import attention_maps, attention_grid, save_figure\n"
         "from qkv.explain import explain_head\n", namespace)
    assert namespace["generate"] is importlib.import_module("qkv.generate").generate


def test_model_attributes_the_readme_names():
    from qkv.attention import MultiHeadAttention
    from qkv.blocks import EncoderBlock

    for attribute in ("project", "W_Q", "W_K", "W_V", "W_O"):
        assert hasattr(MultiHeadAttention, attribute), f"MultiHeadAttention.{attribute} is gone"
    assert hasattr(EncoderBlock, "residual")
    for attribute in ("logits", "num_parameters", "new_cache"):
        assert hasattr(qkv.DecoderLM, attribute), f"DecoderLM.{attribute} is gone"
    assert "name" in inspect.signature(qkv.ModelConfig.preset).parameters
    for preset in ("vaswani-base", "vaswani-big", "gpt2-small", "bert-base", "tiny-decoder", "tiny-encoder",
                   "tiny-seq2seq"):
        qkv.ModelConfig.preset(preset)


def test_the_readme_library_example_gives_the_documented_shapes():
    from qkv import DecoderLM, ModelConfig, Transformer

    config = ModelConfig.preset("tiny-decoder", d_model=128)
    model = DecoderLM(config)
    ids = torch.randint(0, config.vocab_size, (2, 16))
    logits, attentions = model(ids, return_attention=True)
    assert logits.shape == (2, 16, 65)
    assert [a.shape for a in attentions] == [(2, config.n_heads, 16, 16)] * config.n_decoder_layers

    seq2seq = Transformer(ModelConfig.preset("tiny-seq2seq"))
    src, tgt = torch.randint(3, 32, (2, 9)), torch.randint(3, 32, (2, 7))
    src_mask = torch.ones(2, 9, dtype=torch.bool)
    assert seq2seq(src, tgt, src_attention_mask=src_mask).shape == (2, 7, 32)


def test_the_cli_still_offers_every_flag_the_readme_used(capsys):
    from qkv.cli import main

    for command, flags in COMMAND_FLAGS.items():
        with pytest.raises(SystemExit) as exit_info:
            main([*command.split(), "--help"])
        assert exit_info.value.code == 0, f"qkv {command} --help failed"
        text = capsys.readouterr().out
        missing = [flag for flag in flags if flag not in text]
        assert not missing, f"qkv {command} lost the flag(s) {missing}"


# -- checkpoints written by qkv at 5430688 --------------------------------------------------------------------------
def _expected(kind: str) -> dict[str, torch.Tensor]:
    return load_file(str(FIXTURES / kind / "expected.safetensors"))


def _outputs(model, expected: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        if "src_ids" in expected:
            return model(expected["src_ids"], expected["tgt_ids"])
        return model(expected["input_ids"])


DATA = {"decoder": "text.txt", "encoder": "text.txt", "seq2seq": "pairs.tsv"}
OUTPUT = {"decoder": "logits", "encoder": "hidden", "seq2seq": "logits"}


@pytest.mark.parametrize("kind", ["decoder", "encoder", "seq2seq"])
def test_a_checkpoint_written_by_qkv_5430688_loads_and_computes_the_same_numbers(kind):
    model, tokenizer = qkv.load(FIXTURES / kind / "run")
    expected = _expected(kind)
    assert type(model).__name__ == {"decoder": "DecoderLM", "encoder": "Encoder", "seq2seq": "Transformer"}[kind]
    assert not model.training
    if "input_ids" in expected:
        assert tokenizer.encode(_metadata(kind)["text"]) == expected["input_ids"][0].tolist()
    torch.testing.assert_close(_outputs(model, expected), expected[OUTPUT[kind]], atol=1e-5, rtol=0)


def _metadata(kind: str) -> dict[str, str]:
    from safetensors import safe_open

    with safe_open(str(FIXTURES / kind / "expected.safetensors"), "pt") as f:
        return f.metadata()


def test_the_pinned_models_decode_greedily_as_qkv_5430688_did():
    from qkv.generate import generate, generate_seq2seq

    model, _ = qkv.load(FIXTURES / "decoder" / "run")
    expected = _expected("decoder")
    assert generate(model, expected["input_ids"][:, :8], 8, temperature=0).tolist() == expected["greedy_ids"].tolist()

    model, _ = qkv.load(FIXTURES / "seq2seq" / "run")
    expected = _expected("seq2seq")
    out = generate_seq2seq(model, expected["src_ids"], num_beams=1, max_new_tokens=8)
    assert out[0] == expected["greedy_ids"].tolist()


@pytest.mark.parametrize("kind", ["decoder", "encoder", "seq2seq"])
def test_a_run_written_by_qkv_5430688_resumes_for_one_step_as_it_did_then(kind, tmp_path, monkeypatch):
    from qkv.train import resume

    monkeypatch.setenv("QKV_CACHE_DIR", str(tmp_path / "cache"))
    run = shutil.copytree(FIXTURES / kind / "run", tmp_path / "run")
    step = int((run / "latest").read_text().strip().removeprefix("step-"))
    overrides = {"max_steps": step + 1}
    if kind != "seq2seq":  # cosine runs: 5430688 re-derived the cosine for the new end; a finished schedule now
        # stays at its last step's lr, so give the step the lr it had then through the peak lr (0.01)
        from qkv.train import warmup_cosine

        then = warmup_cosine(step, step / (step + 1), warmup=3, min_ratio=0.1)
        overrides["lr"] = 0.01 * then / warmup_cosine(step - 1, (step - 1) / step, warmup=3, min_ratio=0.1)
    result = resume(run, overrides, data=FIXTURES / kind / DATA[kind], print_fn=lambda _: None)
    assert result.step == step + 1
    model, _ = qkv.load(run)
    expected = _expected(kind)
    torch.testing.assert_close(_outputs(model, expected), expected[f"resumed_{OUTPUT[kind]}"], atol=1e-5, rtol=0)
