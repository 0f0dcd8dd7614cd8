"""A conversation keeps its KV cache between replies (qkv.generation.conversation): each turn feeds only the tokens
that follow what the cache holds, and its reply equals a fresh recompute of the whole conversation; streamed text
never shows a half character or a stop string's beginning.

Two tiny real models: a random decoder (2 layers, d_model 64) whose replies depend on every earlier token, and a
"bigram" decoder whose weights are set so that each token's embedding points at the output row of the token that
follows it (its blocks add nothing), so it writes a chosen sequence: an emoji split over four byte tokens, a stop
string across two tokens. Both run the real forward pass; nothing stands in for the model.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import torch

from qkv import ModelConfig
from qkv.chat_template import ChatTemplate
from qkv.generation import GenerationConfig, generate
from qkv.generation.conversation import Conversation, PromptTooLong
from qkv.models import DecoderLM
from qkv.tokenizers import Tokenizer, TokenRoles, decode_continuation

CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
          "'<|im_end|>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
TEXT = ("You are a helpful assistant. What is two and two? It is four, of course. Tell me a story about a cat "
        "who sat on a mat, then say goodbye. The end.\n") * 4
GREEDY = GenerationConfig(max_new_tokens=12, temperature=0)


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    tok = Tokenizer.bpe(TEXT, vocab_size=330, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    return tok.with_roles(TokenRoles.of(eos="<|im_end|>", chat_template=CHATML))


@pytest.fixture(scope="module")
def model(tokenizer: Tokenizer) -> DecoderLM:
    torch.manual_seed(0)
    config = ModelConfig.preset("tiny-decoder", vocab_size=len(tokenizer), max_seq_len=256, positional="rope",
                                init_std=0.3)  # large enough weights that each reply depends on its prompt
    return DecoderLM(config).eval()


def bigram(tokenizer: Tokenizer, chain: list[int]) -> DecoderLM:
    """A decoder that, after chain[i], always writes chain[i + 1] (the blocks' outputs are zero, so the logits are
    the final norm of the last token's embedding times the output layer)."""
    config = ModelConfig.preset("tiny-decoder", vocab_size=len(tokenizer), positional="none", tie_embeddings=False)
    model = DecoderLM(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("out.weight", "out.bias", "w2.weight", "w2.bias")):
                p.zero_()
        model.embed.token.weight.zero_()
        model.lm_head.weight.zero_()
        for slot, (now, after) in enumerate(zip(chain, chain[1:], strict=False)):
            assert model.embed.token.weight[now].abs().sum() == 0, "a bigram chain visits each token once"
            model.embed.token.weight[now, slot] = 10.0
            model.lm_head.weight[after, slot] = 10.0
    return model


def chat(tokenizer: Tokenizer, *turns: str) -> list[dict[str, str]]:
    roles = ["user", "assistant"]
    return [{"role": "system", "content": "You are a helpful assistant."},
            *({"role": roles[i % 2], "content": t} for i, t in enumerate(turns))]


def render(tokenizer: Tokenizer, messages: list[dict[str, str]]) -> list[int]:
    return ChatTemplate(tokenizer).render(messages, add_generation_prompt=True).ids


def run(conversation: Conversation, ids: list[int], config: GenerationConfig = GREEDY, **kw):
    pieces = list(conversation.reply(ids, config, **kw))
    return [p.token_id for p in pieces], "".join(p.text for p in pieces), pieces[-1]


@contextmanager
def count_fed(model: torch.nn.Module) -> Iterator[list[int]]:
    """The number of token positions each forward pass of ``model`` is given (a hook on the real model)."""
    fed: list[int] = []
    handle = model.register_forward_pre_hook(lambda _m, args: fed.append(args[0].shape[1]))
    try:
        yield fed
    finally:
        handle.remove()


def test_turn_three_reply_equals_a_fresh_recompute_of_the_whole_conversation(model, tokenizer):
    conversation = Conversation(model, tokenizer)
    questions = ["What is two and two?", "Tell me a story.", "Say goodbye."]
    replies: list[str] = []
    fed: list[int] = []  # what the cache holds: the last prompt and its reply but the reply's last token
    for question in questions:
        turns = [t for pair in zip(questions, replies, strict=False) for t in pair]
        ids = render(tokenizer, chat(tokenizer, *turns, question))
        tokens, text, last = run(conversation, ids)
        shared = next((i for i, (a, b) in enumerate(zip(fed, ids, strict=False)) if a != b), min(len(fed), len(ids)))
        assert last.reused_tokens == shared  # every earlier token the new prompt repeats came from the cache
        fed = ids + tokens[:-1]
        replies.append(text)
    assert last.reused_tokens > len(render(tokenizer, chat(tokenizer, *questions[:1], replies[0])))
    stop = (tokenizer.eos_id,)
    fresh = generate(model, torch.tensor([ids]), config=GREEDY.replace(stop_token_ids=stop, use_cache=False))
    assert tokens == fresh[0, len(ids):].tolist()
    assert run(Conversation(model, tokenizer), ids)[0] == tokens


def test_the_second_turn_feeds_only_the_tokens_after_the_cached_ones(model, tokenizer):
    conversation = Conversation(model, tokenizer)
    first = render(tokenizer, chat(tokenizer, "What is two and two?"))
    config = GREEDY.replace(max_new_tokens=6)
    with count_fed(model) as fed:
        tokens, _, last = run(conversation, first, config, stop_token_ids=())
    assert (last.reused_tokens, len(tokens), sum(fed)) == (0, 6, len(first) + 5)
    # The next prompt repeats the first, the reply's tokens and a new user turn.
    suffix = render(tokenizer, [{"role": "user", "content": "And three?"}])
    second = first + tokens + suffix
    with count_fed(model) as fed:
        tokens2, _, last = run(conversation, second, config, stop_token_ids=())
    assert last.reused_tokens == len(first) + len(tokens) - 1  # the last reply token was never fed
    assert fed[0] == len(suffix) + 1 == last.prompt_tokens - last.reused_tokens
    assert tokens2 == run(Conversation(model, tokenizer), second, config, stop_token_ids=())[0]


def test_an_edited_earlier_turn_reuses_only_the_common_prefix(model, tokenizer):
    conversation = Conversation(model, tokenizer)
    run(conversation, render(tokenizer, chat(tokenizer, "What is two and two?")))
    edited = render(tokenizer, chat(tokenizer, "What is four and four?"))
    tokens, _, last = run(conversation, edited)
    plain = render(tokenizer, chat(tokenizer, ""))
    assert 0 < last.reused_tokens < len(plain)  # the system turn and the user header
    assert tokens == run(Conversation(model, tokenizer), edited)[0]
    # The same prompt again: everything but its last token is reused, and the reply is the same.
    again, _, last = run(conversation, edited)
    assert (again, last.reused_tokens) == (tokens, len(edited) - 1)


def test_streamed_text_concatenated_equals_the_full_decode(model, tokenizer):
    ids = render(tokenizer, chat(tokenizer, "Tell me a story."))
    config = GenerationConfig(max_new_tokens=40, temperature=1.0, seed=3)
    tokens, text, last = run(Conversation(model, tokenizer), ids, config, stop_token_ids=())
    assert last.finish_reason == "length" and last.completion_tokens == len(tokens) == 40
    # The whole reply decoded at once; a character whose last bytes never came is left out of both.
    assert text == decode_continuation(tokenizer, ids, tokens).rstrip("\ufffd")


def test_the_same_seed_gives_the_same_reply_and_temperature_zero_is_greedy(model, tokenizer):
    ids = render(tokenizer, chat(tokenizer, "Tell me a story."))
    config = GenerationConfig(max_new_tokens=20, temperature=1.3, top_p=0.9)
    replies = [run(Conversation(model, tokenizer), ids, config, generator=torch.Generator().manual_seed(s),
                   stop_token_ids=())[0] for s in (7, 7, 8)]
    assert replies[0] == replies[1] != replies[2]
    assert run(Conversation(model, tokenizer), ids, config.replace(seed=7), stop_token_ids=())[0] == replies[0]
    greedy = generate(model, torch.tensor([ids]), config=GREEDY.replace(stop_token_ids=()))[0, len(ids):].tolist()
    assert run(Conversation(model, tokenizer), ids, GREEDY, stop_token_ids=())[0] == greedy


def test_a_character_split_over_byte_tokens_never_streams_as_a_replacement_character(tokenizer):
    prompt = render(tokenizer, chat(tokenizer, "Smile"))
    emoji = tokenizer.encode("\N{SLIGHTLY SMILING FACE}")
    end = tokenizer.eos_id
    assert len(emoji) == 4  # one token per byte
    model = bigram(tokenizer, [prompt[-1], *emoji, *tokenizer.encode("ok"), end])
    pieces = list(Conversation(model, tokenizer).reply(prompt, GREEDY))
    assert [p.token_id for p in pieces] == [*emoji, *tokenizer.encode("ok"), end]
    assert all("\ufffd" not in p.text for p in pieces)
    assert [p.text for p in pieces[:4]] == ["", "", "", "\N{SLIGHTLY SMILING FACE}"]
    assert (pieces[-1].finish_reason, "".join(p.text for p in pieces)) == ("stop", "\N{SLIGHTLY SMILING FACE}ok")
    # Cut off after three of its bytes, the character never comes out at all.
    cut = list(Conversation(model, tokenizer).reply(prompt, GREEDY.replace(max_new_tokens=3)))
    assert ("".join(p.text for p in cut), cut[-1].finish_reason) == ("", "length")


def test_a_stop_string_across_two_tokens_never_streams_its_beginning(tokenizer):
    prompt = render(tokenizer, chat(tokenizer, "Story?"))
    words = [tokenizer.encode(w) for w in ("You", " cat", " sat", " on", " a", " mat")]
    assert all(len(w) == 1 for w in words)
    model = bigram(tokenizer, [prompt[-1], *(w[0] for w in words)])
    texts = [p.text for p in Conversation(model, tokenizer).reply(prompt, GREEDY, stop_token_ids=())]
    assert "".join(texts).startswith("You cat sat on a mat")
    pieces = list(Conversation(model, tokenizer).reply(prompt, GREEDY, stop_strings=["t sa"], stop_token_ids=()))
    # " cat" could begin "t sa", so its "t" waits; " sat" completes the stop string: nothing of it is shown.
    assert [p.text for p in pieces] == ["You", " ca", ""]
    assert pieces[-1].finish_reason == "stop" and pieces[-1].completion_tokens == 3
    # A held beginning that the next token does not complete comes out with it (and " sat"'s "t" waits).
    pieces = list(Conversation(model, tokenizer).reply(prompt, GREEDY, stop_strings=["t on"], stop_token_ids=()))
    assert [p.text for p in pieces] == ["You", " ca", "t sa", ""]


def test_a_closed_reply_stops_generating_and_the_next_one_still_reuses_the_cache(model, tokenizer):
    conversation = Conversation(model, tokenizer)
    ids = render(tokenizer, chat(tokenizer, "Tell me a story."))
    with count_fed(model) as fed:
        stream = conversation.reply(ids, GREEDY.replace(max_new_tokens=50), stop_token_ids=())
        first = [next(stream).token_id for _ in range(3)]
        stream.close()
    assert sum(fed) == len(ids) + 2 and conversation.cached == ids + first[:2]
    tokens, _, last = run(conversation, ids + first[:2], stop_token_ids=())
    assert last.reused_tokens == len(ids) + 1 and tokens[0] == first[2]


def test_a_prompt_longer_than_the_context_is_one_line_and_the_reply_stops_at_the_context(model, tokenizer):
    conversation = Conversation(model, tokenizer, max_len=40)
    long = render(tokenizer, chat(tokenizer, "What is two and two? " * 8))
    with pytest.raises(PromptTooLong, match=r"is \d+ tokens long but the context holds 40; drop its oldest"):
        conversation.reply(long, GREEDY)
    ids = render(tokenizer, chat(tokenizer, "Hi"))
    tokens, _, last = run(conversation, ids, GREEDY.replace(max_new_tokens=100), stop_token_ids=())
    assert (last.finish_reason, len(ids) + len(tokens) - 1) == ("length", 40)
