"""The compiled decode step (qkv.generation.compile_decoder): the prompt eagerly, each one-token step through one
graph, capacity buckets so other prompt lengths and max_new_tokens reuse it; generate, stream and Conversation
give the eager model's tokens. Dynamo's eager backend traces the same graphs as Inductor without compiling C++
(test_seams has the one Inductor test)."""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.utils import counters

import qkv
from qkv.generation import GenerationConfig, generate, left_pad
from qkv.generation.compiled import SMALLEST_BUCKET, compile_counts, compile_decoder, state_capacity
from qkv.generation.conversation import Conversation
from qkv.tokenizers import Tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")

VOCAB = 64


def llama_like(max_seq_len: int = 600) -> qkv.DecoderLM:
    torch.manual_seed(0)
    config = qkv.ModelConfig(vocab_size=VOCAB, d_model=64, n_heads=4, n_kv_heads=2, d_ff=128, n_decoder_layers=2,
                             max_seq_len=max_seq_len, positional="rope", norm="rmsnorm", activation="swiglu",
                             bias=False, eos_token_id=None)
    return qkv.DecoderLM(config).eval()


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


def test_capacity_buckets_are_powers_of_two_within_the_context():
    assert state_capacity(37, 600, compiled=False) == 37  # eagerly: exactly what is needed
    assert state_capacity(37, 600, compiled=True) == SMALLEST_BUCKET == 256
    assert state_capacity(257, 600, compiled=True) == 512
    assert state_capacity(513, 600, compiled=True) == 600  # never past max_seq_len
    assert state_capacity(700, 600, compiled=False) == 600


@pytest.mark.parametrize("quantized", [None, "int8", "int4"])
def test_a_compiled_model_generates_the_eager_tokens_with_one_graph_for_many_calls(quantized):
    model = llama_like()
    if quantized:
        model = qkv.quantize(model, quantized)
    compiled = compile_decoder(model, backend="eager")
    for prompt, new in ((5, 10), (9, 40), (3, 7), (12, 1)):
        ids = torch.randint(0, VOCAB, (1, prompt), generator=torch.Generator().manual_seed(prompt))
        assert torch.equal(generate(compiled, ids, new, temperature=0), generate(model, ids, new, temperature=0))
        sampled = {"temperature": 0.9, "top_k": 20, "seed": 3}
        assert torch.equal(generate(compiled, ids, new, **sampled), generate(model, ids, new, **sampled))
    assert compile_counts() == {"graphs": 1, "recompiles": 0}  # the prompts ran eagerly; one step graph


def test_a_call_past_the_first_capacity_bucket_compiles_again_and_is_counted_as_a_recompile():
    model = llama_like()
    compiled = compile_decoder(model, backend="eager")
    ids = torch.randint(0, VOCAB, (1, 5), generator=torch.Generator().manual_seed(0))
    generate(compiled, ids, 4, temperature=0)
    assert compile_counts() == {"graphs": 1, "recompiles": 0}
    long = torch.randint(0, VOCAB, (1, SMALLEST_BUCKET + 20), generator=torch.Generator().manual_seed(1))
    assert torch.equal(generate(compiled, long, 4, temperature=0), generate(model, long, 4, temperature=0))
    assert compile_counts() == {"graphs": 2, "recompiles": 1}  # the 512 bucket: one more graph, a recompile
    compile_decoder(model, backend="eager")(ids[:, :1], decode_state=model.new_decode_state(1, SMALLEST_BUCKET))
    assert compile_counts()["recompiles"] == 1  # another wrapper's first graph is not a recompile


def test_a_left_padded_batch_decodes_compiled_as_each_row_alone():
    model = llama_like()
    compiled = compile_decoder(model, backend="eager")
    rows = [[5, 6, 7, 8, 9, 10], [11, 12, 13]]
    ids, mask = left_pad(rows, 0)
    batched = generate(compiled, ids, 12, attention_mask=mask, temperature=0)[:, ids.shape[1]:]
    for row, got in zip(rows, batched, strict=True):
        assert torch.equal(got, generate(model, torch.tensor([row]), 12, temperature=0)[0, len(row):])


def test_a_compiled_conversation_replies_as_the_eager_one_over_several_turns():
    model = llama_like()
    tokenizer = Tokenizer.char("abcdefghijklmnopqrstuvwxyz0123456789 .,?!:\n")
    eager, compiled = Conversation(model, tokenizer), Conversation(compile_decoder(model, backend="eager"), tokenizer)
    cfg = GenerationConfig(max_new_tokens=20, temperature=0)
    prompt: list[int] = tokenizer.encode("user: hello there\nassistant:")
    for turn in range(3):
        replies = [[p.token_id for p in conversation.reply(prompt, cfg, stop_token_ids=())]
                   for conversation in (eager, compiled)]
        assert replies[0] == replies[1]
        prompt = prompt + replies[0] + tokenizer.encode(f"\nuser: and {turn}?\nassistant:")
    assert compiled.state.capacity == SMALLEST_BUCKET  # not the model's 600: a compiled step reads every slot
    counts = compile_counts()
    assert counts["graphs"] == 1 and counts["recompiles"] == 0


def test_compile_decoder_refuses_what_is_not_a_qkv_model():
    with pytest.raises(TypeError, match="qkv Encoder, DecoderLM or Transformer"):
        compile_decoder(torch.nn.Linear(2, 2))


def test_generate_compile_runs_the_inductor_step_and_prints_the_eager_text(tmp_path, capsys):
    """The one Inductor compile of the suite: ``qkv generate --compile`` says how long compiling took and prints
    the eager model's greedy text (the step as generated C++, the same tokens), with the weights frozen into the
    graph: the step's matrix products run on MKL's prepacked weights (eagerly, the prompt's run on ``aten::mm``)."""
    import torch._inductor.config as inductor

    from qkv.checkpoint import save_checkpoint
    from qkv.cli import main

    tokenizer = Tokenizer.char("abcdefghijklmnopqrstuvwxyz .,")
    model = llama_like(max_seq_len=300)
    save_checkpoint(tmp_path / "ckpt", model, tokenizer)
    texts = []
    for flags in ([], ["--compile"]):
        with inductor.patch(compile_threads=1), torch.profiler.profile() as profile:  # one small graph: no pool
            assert main(["generate", "--checkpoint", str(tmp_path / "ckpt"), "--greedy", "--max-new-tokens", "24",
                         *flags, "the cat"]) == 0
        out, err = capsys.readouterr()
        texts.append(out)
    assert texts[0] == texts[1] and len(texts[0]) > len("the cat")
    assert "compiled in" in err and "(1 graph)" in err
    if torch.backends.mkl.is_available():
        assert "mkl::_mkl_linear" in {event.key for event in profile.key_averages()}


def test_without_the_cache_a_compiled_model_decodes_eagerly_and_the_cli_refuses_the_pair(tmp_path, capsys):
    from qkv.checkpoint import save_checkpoint
    from qkv.cli import main

    model = llama_like()
    compiled = compile_decoder(model, backend="eager")
    ids = torch.tensor([[3, 4, 5]])
    assert torch.equal(generate(compiled, ids, 6, temperature=0, use_cache=False),
                       generate(model, ids, 6, temperature=0))
    assert compile_counts()["graphs"] == 0  # a prefix that grows each step never goes through the graph
    save_checkpoint(tmp_path / "ckpt", model, Tokenizer.char("abcdefghijklmnopqrstuvwxyz "))
    assert main(["generate", "--checkpoint", str(tmp_path / "ckpt"), "--compile", "--no-cache", "abc"]) == 2
    assert "drop --no-cache or --compile" in capsys.readouterr().err
