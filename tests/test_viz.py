"""Pictures of attention and positions: the data drawn is the model's own, rows are distributions, labels are the
tokenizer's pieces, a decoder's maps are causal, and positional pictures show the structure the formulas predict."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from qkv import ModelConfig
from qkv.checkpoint import save_checkpoint
from qkv.cli import main
from qkv.models import build_model
from qkv.positions import POSITIONAL_KINDS, alibi_slopes
from qkv.tokenizers import Tokenizer
from qkv.viz import (
    attention_grid,
    attention_heatmap,
    attention_lines,
    attention_maps,
    encoding_for_kind,
    positional_picture_data,
    positions_figure,
)
from qkv.viz.heatmap import visible

pytest.importorskip("matplotlib")

TEXT = "The animal didn't cross the street because it was too tired."
PRESETS = {"encoder": "tiny-encoder", "decoder": "tiny-decoder", "seq2seq": "tiny-seq2seq"}


def tiny(model_type: str, **overrides):
    torch.manual_seed(0)
    tokenizer = Tokenizer.char(TEXT + "xyz", ["<bos>"])
    config = ModelConfig.preset(PRESETS[model_type], vocab_size=tokenizer.vocab_size, **overrides)
    return build_model(config).eval(), tokenizer


@pytest.mark.parametrize("model_type", ["encoder", "decoder", "seq2seq"])
def test_every_row_drawn_is_a_distribution_and_labels_are_the_pieces(model_type):
    model, tokenizer = tiny(model_type)
    found = attention_maps(model, tokenizer, TEXT, target="the street" if model_type == "seq2seq" else None)
    expected_kinds = {"encoder": ["encoder"], "decoder": ["decoder_self"],
                      "seq2seq": ["encoder", "decoder_self", "cross"]}[model_type]
    assert found.kinds == expected_kinds
    pieces = tokenizer.pieces(TEXT)
    assert found.inputs.labels == pieces
    for kind, maps in found.maps.items():
        queries, keys = found.labels(kind)
        assert maps.shape[2:] == (len(queries), len(keys))
        assert torch.allclose(maps.sum(-1), torch.ones(maps.shape[:-1]), atol=1e-5)
        assert (maps >= 0).all()
    if model_type == "seq2seq":
        assert found.labels("cross") == (["<bos>", *tokenizer.pieces("the street")], pieces)
    # the JSON the page draws is the same data, rounded
    data = found.to_dict()
    for kind in found.kinds:
        rows = np.array(data["maps"][kind]).sum(-1)
        assert np.allclose(rows, 1.0, atol=1e-4)


def test_encoder_decoder_shows_its_own_translation_by_default():
    from qkv.generate import generate_seq2seq

    torch.manual_seed(0)
    tokenizer = Tokenizer.char(TEXT, ["<pad>", "<bos>", "<eos>"])
    model = build_model(ModelConfig.preset("tiny-seq2seq", vocab_size=tokenizer.vocab_size)).eval()
    found = attention_maps(model, tokenizer, "the cat")
    source = [*tokenizer.encode("the cat"), tokenizer.eos_id]  # as qkv.translation trains it
    assert found.inputs.ids[0].tolist() == source and found.inputs.labels[-1] == "<eos>"
    output = generate_seq2seq(model, [source], bos_token_id=tokenizer.bos_id, eos_token_id=tokenizer.eos_id,
                              pad_token_id=tokenizer.pad_id, max_new_tokens=63)[0]
    assert found.inputs.target_ids[0].tolist() == [tokenizer.bos_id, *output]
    assert found.maps["cross"].shape[2:] == (1 + len(output), len(source))


@pytest.mark.parametrize("model_type", ["decoder", "seq2seq"])
def test_masked_decoder_maps_are_lower_triangular(model_type):
    model, tokenizer = tiny(model_type)
    maps = attention_maps(model, tokenizer, TEXT).maps["decoder_self"]
    n = maps.shape[-1]
    future = ~torch.ones(n, n, dtype=torch.bool).tril()
    assert float(maps[..., future].abs().max()) == 0.0
    assert (maps[..., ~future] > 0).all()  # and nothing in the past is masked


def test_maps_are_the_models_returned_attention():
    model, tokenizer = tiny("decoder", positional="rope")
    found = attention_maps(model, tokenizer, TEXT)
    _, returned = model(torch.tensor([tokenizer.encode(TEXT)]), return_attention=True)
    assert torch.equal(found.maps["decoder_self"], torch.stack([w[0] for w in returned]))


def test_grid_panels_hold_each_head_with_token_labels():
    model, tokenizer = tiny("encoder")
    found = attention_maps(model, tokenizer, "the cat sat")
    maps = found.maps["encoder"]
    fig = attention_grid(maps, *found.labels("encoder"), title="t")
    axes = np.array(fig.axes[: maps.shape[0] * maps.shape[1]]).reshape(maps.shape[0], maps.shape[1])
    for layer in range(maps.shape[0]):
        for head in range(maps.shape[1]):
            drawn = axes[layer, head].images[0].get_array()
            assert np.allclose(drawn, maps[layer, head].numpy())
    labels = [visible(t) for t in tokenizer.pieces("the cat sat")]
    assert [t.get_text() for t in axes[0, 0].get_yticklabels()] == labels  # queries on the left column
    assert [t.get_text() for t in axes[-1, 0].get_xticklabels()] == labels  # keys on the bottom row
    import matplotlib.pyplot as plt

    plt.close(fig)


def test_lines_picture_draws_one_line_per_query_key_head_with_opacity_the_weight():
    import matplotlib.pyplot as plt

    model, tokenizer = tiny("decoder")
    found = attention_maps(model, tokenizer, "the cat sat")
    maps = found.maps["decoder_self"][1]  # (heads, q, k)
    fig = attention_lines(maps, found.inputs.labels, heads=[0, 2], threshold=0.1)
    collection = fig.axes[0].collections[0]
    expected = [(h, i, j) for h in (0, 2) for i, j in (maps[h] >= 0.1).nonzero().tolist()]
    segments, colours = collection.get_segments(), collection.get_colors()
    assert len(segments) == len(expected) > 0
    for (h, i, j), segment, colour in zip(expected, segments, colours, strict=True):
        assert segment.tolist() == [[0.0, -i], [1.0, -j]]  # query i (left) to key j (right)
        assert colour[3] == pytest.approx(float(maps[h, i, j]), abs=1e-6)
    assert len({tuple(c[:3]) for c in colours}) == 2  # one colour per head
    plt.close(fig)


def test_heatmap_keeps_its_signature_and_checks_labels():
    fig = attention_heatmap(torch.eye(3), ["a", "b", "c"], title="identity")
    assert np.allclose(fig.axes[0].images[0].get_array(), np.eye(3))
    with pytest.raises(ValueError, match="labels"):
        attention_heatmap(torch.eye(3), ["a", "b"])


def test_out_of_range_layer_and_head_name_the_range():
    model, tokenizer = tiny("decoder")
    found = attention_maps(model, tokenizer, "the cat")
    assert torch.equal(found.head(-1, -1), found.maps["decoder_self"][1, 3])
    with pytest.raises(ValueError, match=r"layer=2 is out of range: there are 2 layers; use 0 to 1"):
        found.head(2, 0)
    with pytest.raises(ValueError, match=r"head=4 is out of range"):
        found.head(0, 4)
    with pytest.raises(ValueError, match="no 'cross' attention"):
        found.head(0, 0, "cross")


def test_bad_text_is_refused_with_the_fix():
    model, tokenizer = tiny("decoder")
    with pytest.raises(ValueError, match="empty"):
        attention_maps(model, tokenizer, "  ")
    long = "the " * 40  # 160 characters > max_seq_len 128
    with pytest.raises(ValueError, match=r"160 tokens but the model's context holds 128"):
        attention_maps(model, tokenizer, long)


# -- positional encodings ------------------------------------------------------------------------------------------


def _coincide(curves: dict[str, torch.Tensor]) -> bool:
    """Where two curves are both defined (same distance seen from two reference positions), they agree."""
    values = list(curves.values())
    first = values[0]
    return all(torch.allclose(first[m], other[m], atol=1e-4)
               for other in values[1:] for m in [~first.isnan() & ~other.isnan()])


def test_sinusoidal_dot_product_depends_on_distance_only():
    encoding = encoding_for_kind("sinusoidal", n_positions=64, d_model=32)
    data = positional_picture_data(encoding, 64)
    assert torch.equal(data.table, encoding.table(64))
    assert _coincide(data.curves)
    # PE(i)·PE(i+d) = Σ_i sin·sin + cos·cos = Σ_i cos(d w_i), from the formula
    w = 1.0 / 10000 ** (torch.arange(0, 32, 2, dtype=torch.float64) / 32)
    expected = torch.cos(data.distances[:, None].double() * w).sum(-1)
    curve = data.curves["from position 0"]
    defined = ~curve.isnan()
    assert torch.allclose(curve[defined], expected[defined], atol=1e-4)


def test_rope_score_depends_on_distance_only_and_learned_need_not():
    rope = positional_picture_data(encoding_for_kind("rope", n_positions=48, d_model=64, n_heads=4), 48)
    assert rope.table.shape == (48, 16) and _coincide(rope.curves)
    torch.manual_seed(0)
    learned = encoding_for_kind("learned", n_positions=48, d_model=64)
    torch.nn.init.normal_(learned.weight.weight)
    data = positional_picture_data(learned, 48)
    assert torch.equal(data.table, learned.weight.weight[:48])
    assert not _coincide(data.curves)


def test_alibi_curves_are_minus_slope_times_distance():
    data = positional_picture_data(encoding_for_kind("alibi", n_positions=32, n_heads=8), 32)
    slopes = alibi_slopes(8).double()
    for h in range(8):
        curve = data.curves[f"head {h}"]
        defined = ~curve.isnan()
        assert torch.allclose(curve[defined], -slopes[h] * data.distances[defined].abs().double(), atol=1e-6)
    encoding = encoding_for_kind("alibi", n_positions=32, n_heads=8)  # the table is head 0's bias, as the model adds
    assert torch.equal(data.table, encoding.attention_bias(32, 32, torch.device("cpu"))[0, 0])


@pytest.mark.parametrize("kind", POSITIONAL_KINDS)
def test_every_encoding_has_a_picture(kind):
    import matplotlib.pyplot as plt

    fig = positions_figure(encoding_for_kind(kind, n_positions=32, d_model=32, n_heads=4), 32)
    assert f"positional encoding: {kind}" in fig._suptitle.get_text()
    plt.close(fig)


# -- the command line ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt")
    for model_type in PRESETS:
        save_checkpoint(root / model_type, *tiny(model_type))
    return root


def test_show_attention_writes_one_picture_per_kind(checkpoints, tmp_path, capsys):
    out = tmp_path / "att.png"
    assert main(["show", "attention", "--checkpoint", str(checkpoints / "seq2seq"), "the cat", "--out",
                 str(out), "--dpi", "40"]) == 0
    for kind in ("encoder", "decoder_self", "cross"):
        png = tmp_path / f"att-{kind}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main(["show", "attention", "--checkpoint", str(checkpoints / "decoder"), "the cat", "--layer", "1",
                 "--head", "2", "--out", str(out), "--dpi", "40"]) == 0
    assert out.read_bytes()[:4] == b"\x89PNG"
    printed = capsys.readouterr().out
    assert "'t' 'h' 'e' ' ' 'c' 'a' 't'" in printed
    assert "self-attention: layer 1 head 2 (counting from 0))" in printed  # what was drawn, not the model's size


def test_show_attention_picks_heads_draws_lines_and_reports_a_token(checkpoints, tmp_path, capsys):
    out = tmp_path / "picked.png"
    assert main(["show", "attention", "--checkpoint", str(checkpoints / "decoder"), "the cat sat", "--pick", "1:2",
                 "--pick", "0:0", "--lines", "--token", "sat", "--out", str(out), "--dpi", "40"]) == 0
    assert out.read_bytes()[:4] == b"\x89PNG"
    printed = capsys.readouterr().out
    assert "layer 1 head 2: 's' attends most to" in printed and "layer 0 head 0:" in printed
    assert "layer 1 head 2, layer 0 head 0 as lines (counting from 0))" in printed
    assert main(["show", "attention", "--checkpoint", str(checkpoints / "decoder"), "the cat", "--pick", "1"]) == 2
    assert "not LAYER:HEAD" in capsys.readouterr().err


def test_show_positions_from_a_checkpoint_and_by_kind(checkpoints, tmp_path):
    assert main(["show", "positions", "--checkpoint", str(checkpoints / "decoder"), "--out",
                 str(tmp_path / "p.png"), "--dpi", "40"]) == 0
    assert (tmp_path / "p.png").is_file()
    assert main(["show", "positions", "--positional", "all", "--positions", "16", "--out",
                 str(tmp_path / "q.png"), "--dpi", "40"]) == 0
    assert sorted(p.name for p in tmp_path.glob("q-*.png")) == sorted(f"q-{k}.png" for k in POSITIONAL_KINDS)


@pytest.mark.parametrize(("argv", "message"), [
    (["--checkpoint", "{root}/missing", "the cat"], "does not exist"),
    (["--checkpoint", "{root}/decoder", ""], "the text is empty"),
    (["--checkpoint", "{root}/decoder", "the " * 40], "context holds 128"),
    (["--checkpoint", "{root}/decoder", "the cat", "--layer", "7"], "layer=7 is out of range"),
    (["--checkpoint", "{root}/decoder", "the cat", "--layer", "0", "--head", "9"], "head=9 is out of range"),
    (["--checkpoint", "{root}/decoder", "the cat", "--head", "1"], "--head needs --layer"),
])
def test_show_attention_bad_input_is_one_line_and_exit_2(checkpoints, tmp_path, capsys, argv, message):
    argv = [a.replace("{root}", str(checkpoints)) for a in argv]
    assert main(["show", "attention", *argv, "--out", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_cli_reads_the_text_from_stdin(checkpoints, tmp_path, monkeypatch, capsys):
    import io

    monkeypatch.setattr("sys.stdin", io.StringIO("\nthe cat\n"))
    assert main(["show", "attention", "--checkpoint", str(checkpoints / "encoder"), "--out",
                 str(tmp_path / "s.png"), "--dpi", "40"]) == 0
    assert "7 tokens" in capsys.readouterr().out


def test_label_whitespace_is_visible():
    assert visible(" a\n") == "␣a⏎" and visible("") == "∅"


def _pixel(fig, ax, row: int, column: int) -> tuple[int, ...]:
    """The RGBA colour drawn at the centre of cell (row, column) of a heatmap."""
    fig.canvas.draw()
    x, y = ax.transData.transform((column, row))
    image = np.asarray(fig.canvas.buffer_rgba())
    return tuple(int(v) for v in image[image.shape[0] - int(round(y)), int(round(x))])


def test_masked_cells_are_drawn_unlike_weight_zero_and_the_colour_bar_is_named():
    import matplotlib.pyplot as plt

    from qkv.attention import causal_mask

    weights = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.5, 0.0, 0.5]])  # (1, 0) and (2, 1): weight 0
    mask = causal_mask(3)
    fig = attention_heatmap(weights, ["a", "b", "c"], mask=mask, title="t")
    ax, bar = fig.axes
    assert bar.get_ylabel() == "attention weight"
    assert (ax.get_xlabel(), ax.get_ylabel()) == ("key (attended to)", "query (attending)")
    drawn = ax.images[0].get_array()
    assert np.array_equal(np.ma.getmaskarray(drawn), ~mask.numpy())  # exactly the cells the mask forbids
    zero, masked = _pixel(fig, ax, 1, 0), _pixel(fig, ax, 0, 2)
    assert zero != masked and _pixel(fig, ax, 2, 1) == zero  # weight 0 looks like weight 0, not like masked
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["masked: may not attend"]
    plt.close(fig)


def test_grids_name_both_axes_share_one_named_scale_and_count_from_zero(checkpoints, tmp_path):
    import matplotlib.pyplot as plt

    model, tokenizer = tiny("decoder")
    found = attention_maps(model, tokenizer, "the cat")
    maps = found.maps["decoder_self"]
    fig = attention_grid(maps, *found.labels("decoder_self"), title="t", mask=found.mask("decoder_self"))
    assert fig.get_supxlabel() == "key (attended to)" and fig.get_supylabel() == "query (attending)"
    assert "layers and heads count from 0" in fig.get_suptitle()
    panels, bar = fig.axes[:-1], fig.axes[-1]
    assert bar.get_ylabel() == "attention weight"
    assert {ax.images[0].get_clim() for ax in panels} == {(0.0, 1.0)}  # one scale for every panel
    future = ~found.mask("decoder_self").numpy()
    assert future.sum() == 7 * 6 // 2 and all(np.array_equal(np.ma.getmaskarray(ax.images[0].get_array()), future)
                                              for ax in panels)
    assert [ax.get_title() for ax in panels[: maps.shape[1]]] == [f"head {h}" for h in range(maps.shape[1])]
    assert [panels[r * maps.shape[1]].get_ylabel() for r in range(maps.shape[0])] == ["layer 0", "layer 1"]
    plt.close(fig)


def test_pictures_and_the_explain_table_say_that_layers_and_heads_count_from_zero(checkpoints, capsys):
    import matplotlib.pyplot as plt

    from qkv.viz import attention_picture

    model, tokenizer = tiny("decoder")
    found = attention_maps(model, tokenizer, "the cat")
    one, shown = attention_picture(found, "decoder_self", layer=-1, head=2)
    assert shown == [(1, 2)] and one.axes[0].get_title().endswith("layer 1, head 2 (counting from 0)")
    picked, shown = attention_picture(found, "decoder_self", picks=[(0, 1), (1, 3)], title="t")
    assert shown == [(0, 1), (1, 3)] and "layers and heads count from 0" in picked.get_suptitle()
    for fig in (one, picked):
        plt.close(fig)
    assert main(["explain", "--checkpoint", str(checkpoints / "decoder"), "the cat", "--layer", "1", "--head", "2",
                 "--token", "cat"]) == 0
    assert "(layers, heads and tokens count from 0)" in capsys.readouterr().out
