"""``qkv explain``: one head's arithmetic, step by step, equals what the model computed in its own forward pass."""

from __future__ import annotations

import json
import math

import pytest
import torch

from qkv import ModelConfig
from qkv.checkpoint import save_checkpoint
from qkv.cli import main
from qkv.explain import TOLERANCE, explain_head, find_token
from qkv.models import build_model
from qkv.tokenizers import Tokenizer

TEXT = "The animal didn't cross the street because it was too tired."
PRESETS = {"encoder": "tiny-encoder", "decoder": "tiny-decoder", "seq2seq": "tiny-seq2seq"}


def tiny(model_type: str, **overrides):
    torch.manual_seed(0)
    tokenizer = Tokenizer.char(TEXT, ["<bos>"])
    config = ModelConfig.preset(PRESETS[model_type], vocab_size=tokenizer.vocab_size, **overrides)
    model = build_model(config).eval()
    with torch.no_grad():  # larger weights than the init, so softmax rows are far from uniform
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(8.0)
    return model, tokenizer


CASES = [
    ("decoder", "decoder_self", {"positional": "learned"}),
    ("decoder", "decoder_self", {"positional": "rope"}),
    ("decoder", "decoder_self", {"positional": "alibi", "n_kv_heads": 2}),
    ("encoder", "encoder", {"positional": "sinusoidal", "norm_position": "post"}),
    ("seq2seq", "encoder", {}),
    ("seq2seq", "decoder_self", {}),
    ("seq2seq", "cross", {}),
]


@pytest.mark.parametrize(("model_type", "kind", "overrides"), CASES)
def test_explained_output_equals_the_heads_output_in_the_forward_pass(model_type, kind, overrides):
    model, tokenizer = tiny(model_type, **overrides)
    for layer, head, token in [(0, 0, 0), (-1, -1, 20), (1, 2, -1)]:
        e = explain_head(model, tokenizer, TEXT, layer=layer, head=head, token=token, kind=kind)
        assert e.max_error <= TOLERANCE and e.matches_model
        assert torch.allclose(e.weights, e.model_weights, atol=1e-6)  # the row the model returned
        assert math.isclose(float(e.weights.sum()), 1.0, abs_tol=1e-9)
        assert torch.allclose(e.scaled, e.dots / math.sqrt(e.d_k))
        assert torch.allclose(e.output, (e.weights[:, None] * e.values).sum(0))
        if kind == "decoder_self":  # the masked decoder never looks ahead
            assert e.visible.tolist() == [j <= e.token for j in range(len(e.key_labels))]
            assert float(e.weights[e.token + 1:].abs().sum()) == 0.0
        assert (e.bias is not None) == (overrides.get("positional") == "alibi")
        assert e.rotary == (overrides.get("positional") == "rope")


def test_concatenated_heads_through_w_o_give_the_attention_sublayer_output():
    """An independent check: Concat(z_1..z_h) W_O + b is what the attention module returned for that token."""
    model, tokenizer = tiny("decoder")
    module = model.layers.layers[1].self_attn
    seen = {}

    def keep(_module, _args, out) -> None:
        seen["out"] = out[0].detach()

    hook = module.register_forward_hook(keep)
    try:
        model(torch.tensor([tokenizer.encode(TEXT)]))
    finally:
        hook.remove()
    token = 30
    heads = [explain_head(model, tokenizer, TEXT, layer=1, head=h, token=token).output
             for h in range(module.n_heads)]
    concat = torch.cat(heads).float()
    expected = seen["out"][0, token]
    assert torch.allclose(concat @ module.W_O + module.out.bias, expected, atol=1e-5)


def test_a_head_that_focuses_is_explained_with_its_real_numbers():
    model, tokenizer = tiny("decoder")
    e = explain_head(model, tokenizer, TEXT, layer=0, head=1, token=40)
    logits = e.scaled[: e.token + 1]
    assert torch.allclose(e.weights[: e.token + 1], torch.exp(logits - logits.max()) / torch.exp(
        logits - logits.max()).sum())
    assert e.weights.max() > 2.0 / (e.token + 1)  # not the uniform row of an untrained model


def test_find_token_by_index_or_text():
    labels = ["[CLS]", "the", "animal", "it", "##s", "[SEP]"]
    assert find_token(labels, "2") == 2 and find_token(labels, -1) == 5 and find_token(labels, "It") == 3
    assert find_token(labels, "s") == 4
    chars = list("didn't it")
    assert find_token(chars, "it") == 7  # spelled by characters, at a word boundary (not inside "didn't")
    with pytest.raises(ValueError, match="no token 'dog'.*2:'animal'"):
        find_token(labels, "dog")
    with pytest.raises(ValueError, match="token=6 is out of range"):
        find_token(labels, 6)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("explain") / "decoder"
    save_checkpoint(path, *tiny("decoder"))
    return path


def test_cli_table_and_json_carry_the_same_numbers(checkpoint, capsys):
    argv = ["explain", "--checkpoint", str(checkpoint), TEXT, "--layer", "1", "--head", "2", "--token", "it"]
    assert main(argv) == 0
    table = capsys.readouterr().out
    assert f"query token {TEXT.index(' it ') + 1} 'i'" in table
    assert "equal: max |z - model|" in table and "masked" in table
    assert main([*argv, "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["token"] == TEXT.index(" it ") + 1 and data["matches_model"] is True
    assert abs(sum(data["weights"]) - 1.0) < 1e-9
    assert f"{data['weights'][0]:.4f}" in table


@pytest.mark.parametrize(("extra", "message"), [
    (["--layer", "2", "--head", "0", "--token", "0"], "layer=2 is out of range"),
    (["--layer", "0", "--head", "4", "--token", "0"], "head=4 is out of range"),
    (["--layer", "0", "--head", "0", "--token", "99"], "token=99 is out of range"),
    (["--layer", "0", "--head", "0", "--token", "0", "--kind", "cross"], "no 'cross' attention"),
])
def test_cli_out_of_range_is_a_message_and_exit_2(checkpoint, capsys, extra, message):
    assert main(["explain", "--checkpoint", str(checkpoint), "the cat", *extra]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_cli_missing_checkpoint_and_empty_text(tmp_path, checkpoint, capsys):
    assert main(["explain", "--checkpoint", str(tmp_path / "nope"), "x", "--layer", "0", "--head", "0",
                 "--token", "0"]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["explain", "--checkpoint", str(checkpoint), " ", "--layer", "0", "--head", "0",
                 "--token", "0"]) == 2
    assert "empty" in capsys.readouterr().err
