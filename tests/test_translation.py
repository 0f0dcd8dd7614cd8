"""Translation: the parallel reader, the split by source sentence, the shared BPE, token batches with masks on both
sides, the seq2seq objective in the trainer, BLEU, and the synthetic tasks that check any seq2seq change quickly."""

from __future__ import annotations

import zipfile
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qkv import ModelConfig, Transformer
from qkv.generate import generate_seq2seq
from qkv.tasks import BOS, EOS, FIRST_SYMBOL, PAD, addition_task, exact_match, reverse_task, sort_task
from qkv.tokenizers import Tokenizer
from qkv.train import TrainConfig, Trainer
from qkv.translation import (
    TaskBatches,
    TokenBatches,
    corpus_scores,
    encode_pairs,
    pad_batch,
    prepare,
    read_parallel,
    references_by_source,
    split_by_source,
    train_shared_bpe,
    translate,
)

DATA = Path(__file__).resolve().parents[1] / "data"
FRA = DATA / "tatoeba-fra-eng-2017-09-29.zip"


pytestmark = pytest.mark.usefixtures("one_thread")


# -- synthetic tasks --------------------------------------------------------------------------------------------
def train_task(task: str, size: int, vocab: int, steps: int, tmp_path: Path, **model) -> Transformer:
    """The tiny-seq2seq preset trained on a synthetic task with the ordinary trainer and the seq2seq objective.

    init_std 0.1 (not 0.02): with tiny initial attention weights, q·k starts near 0 for every pair and learning
    to attend by position sits on a plateau for ~500 steps; larger weights leave it in ~150.
    """
    torch.manual_seed(0)
    config = ModelConfig.preset("tiny-seq2seq", vocab_size=vocab, max_seq_len=2 * size + 4, init_std=0.1, **model)
    net = Transformer(config)
    tok = Tokenizer.char("abcdefghijklmnopqrstuvwxyz"[: vocab - 3], special_tokens=["<pad>", "<bos>", "<eos>"])
    train = TrainConfig(max_steps=steps, lr=3e-3, warmup_steps=50, schedule="cosine", min_lr_ratio=0.05,
                        weight_decay=0.0, grad_clip=1.0, eval_every=steps, eval_batches=1, save_every=0,
                        progress=False, log_every=steps)
    data = TaskBatches(task, size, vocab, 64, seed=1)
    Trainer(net, tok, data, data, train, tmp_path / task, print_fn=lambda _: None).fit()
    return net.eval()


def held_out_exact_match(net: Transformer, task: str, size: int, vocab: int, n: int = 500) -> float:
    src, tgt = TaskBatches(task, size, vocab, n, seed=99).draw(n, seed=12345)
    src = TaskBatches.as_batch(src, tgt).src  # with its <eos>, as in training
    out = generate_seq2seq(net, src, num_beams=1, bos_token_id=BOS, eos_token_id=EOS,
                           max_new_tokens=tgt.shape[1] - 1)
    predicted = torch.tensor([row + [EOS] + [PAD] * (tgt.shape[1] - 2 - len(row)) for row in out])
    return exact_match(predicted[:, : tgt.shape[1] - 1], tgt[:, 1:])


@pytest.mark.parametrize("task", ["copy", "reverse"])
def test_copy_and_reverse_reach_99_percent_exact_match(task, tmp_path):
    net = train_task(task, 8, 13, 300, tmp_path)
    assert held_out_exact_match(net, task, 8, 13) >= 0.99


def test_sort_and_addition_tasks_compute_what_they_say():
    g = torch.Generator().manual_seed(0)
    src, tgt = sort_task(50, 6, 12, generator=g)
    assert torch.equal(tgt[:, 1:-1], src.sort(dim=1).values) and (tgt[:, 0] == BOS).all() and (tgt[:, -1] == EOS).all()
    src, tgt = reverse_task(50, 6, 12, generator=g)
    assert torch.equal(tgt[:, 1:-1].flip(1), src)
    src, tgt = addition_task(200, 3, generator=g)

    def number(digits: torch.Tensor) -> list[int]:
        return [int("".join(str(int(d) - FIRST_SYMBOL) for d in row)) for row in digits]

    a, b, total = number(src[:, :3]), number(src[:, 4:]), number(tgt[:, 1:-1])
    assert [x + y for x, y in zip(a, b, strict=True)] == total
    with pytest.raises(ValueError, match="vocab_size"):
        addition_task(2, 3, vocab_size=10)


# -- reading parallel files -------------------------------------------------------------------------------------
def test_bad_lines_are_skipped_and_counted(tmp_path):
    path = tmp_path / "pairs.tsv"
    path.write_bytes(b"Hello.\tBonjour.\nno tab here\n\tvide\nempty target\t \n"
                     + "Caf\xe9?\tCaf\xe9 ?\n".encode("latin-1") + b"Thanks.\tMerci.\textra column\r\n\n")
    corpus = read_parallel(path)
    assert corpus.pairs == [("Hello.", "Bonjour."), ("Thanks.", "Merci.")]
    assert corpus.skipped == {"without a tab": 1, "with an empty side": 2, "not valid UTF-8": 1}
    assert "skipped 4 bad line(s)" in corpus.report()


def test_a_file_with_nothing_usable_is_a_clear_error(tmp_path):
    path = tmp_path / "bad.tsv"
    path.write_text("just text\nmore text\n")
    with pytest.raises(ValueError, match="no usable sentence pair.*2 without a tab"):
        read_parallel(path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_parallel(tmp_path / "missing.tsv")


def test_tatoeba_zip_is_read_without_extracting(tmp_path):
    corpus = read_parallel(FRA)
    assert corpus.source.endswith("fra.txt") and corpus.n_skipped == 0
    assert len(corpus.pairs) == 142_787 and corpus.pairs[0] == ("Go.", "Va !")
    with zipfile.ZipFile(FRA) as archive:  # the license notice travels with the data
        assert "Attribution: www.manythings.org/anki and tatoeba.org" in archive.read("_about.txt").decode()
    small = tmp_path / "small.zip"
    with zipfile.ZipFile(small, "w") as archive:
        archive.writestr("_about.txt", "about")
        archive.writestr("deu.txt", "Hi.\tHallo.\n")
    assert read_parallel(small).pairs == [("Hi.", "Hallo.")]


# -- the split --------------------------------------------------------------------------------------------------
@given(st.lists(st.tuples(st.sampled_from("abcdefghijklmnopqrstuvwxyz"), st.text("xyz", min_size=1, max_size=3)),
                min_size=8, max_size=60), st.integers(0, 2**16))
def test_split_never_puts_one_source_sentence_on_two_sides(pairs, seed):
    n_sources = len({s for s, _ in pairs})
    if n_sources < 4:
        with pytest.raises(ValueError, match="too few"):
            split_by_source(pairs, n_test=2, n_valid=1, seed=seed)
        return
    splits = split_by_source(pairs, n_test=2, n_valid=1, seed=seed)
    train, valid, test = splits.sources("train"), splits.sources("valid"), splits.sources("test")
    assert not (train & valid or train & test or valid & test)
    assert len(test) == 2 and len(valid) == 1
    assert sorted(splits.train + splits.valid + splits.test) == sorted(pairs)  # nothing lost, nothing doubled


def test_tatoeba_test_split_is_2000_english_sentences_with_all_their_references():
    pairs = read_parallel(FRA).pairs
    splits = split_by_source(pairs)
    assert splits == split_by_source(pairs)  # fixed by the seed
    test = splits.sources("test")
    assert len(test) == 2000
    assert not test & splits.sources("train") and not test & splits.sources("valid")
    assert sorted(splits.test) == sorted(p for p in pairs if p[0] in test)
    sources, references = references_by_source(splits.test)
    assert len(sources) == 2000 and sum(map(len, references)) == len(splits.test) > 2000


# -- training never reads the test split -----------------------------------------------------------------------
def _random_pairs(n: int, seed: int) -> list[tuple[str, str]]:
    """Sentences of made-up words; some sources get two translations, as on Tatoeba."""
    g = torch.Generator().manual_seed(seed)

    def word() -> str:
        return "".join(chr(ord("a") + int(i)) for i in torch.randint(0, 26, (int(torch.randint(2, 7, ())),),
                                                                     generator=g))

    pairs = []
    for _ in range(n):
        src = " ".join(word() for _ in range(int(torch.randint(2, 6, ()))))
        for _ in range(1 + int(torch.rand((), generator=g) < 0.3)):
            pairs.append((src + ".", " ".join(word() for _ in range(int(torch.randint(2, 6, ())))) + " !"))
    return pairs


def test_training_never_reads_the_test_split(tmp_path):
    pairs = _random_pairs(300, seed=3)
    path = tmp_path / "pairs.tsv"
    path.write_text("".join(f"{s}\t{t}\n" for s, t in pairs))
    data = prepare(path, max_seq_len=64, vocab_size=400, max_tokens=256, n_test=40, n_valid=20, split_seed=7)
    splits = split_by_source(pairs, n_test=40, n_valid=20, seed=7)
    assert data.splits == splits
    # The vocabulary is the one the training split alone gives, and the test split would have changed it.
    vocab = data.tokenizer.backend.get_vocab()
    assert vocab == train_shared_bpe(splits.train, 400).backend.get_vocab()
    assert vocab != train_shared_bpe(splits.train + splits.test, 400).backend.get_vocab()
    # Every pair the trainer is served (two epochs of training batches, and the validation batches) is a training
    # or validation pair; no test sentence, source or target, is ever among them.
    tok = data.tokenizer
    seen = set()
    for batch in [data.train.batch(i) for i in range(2 * len(data.train))] + data.valid.fixed(len(data.valid)):
        for src, tgt in zip(batch.src.tolist(), batch.tgt_out.tolist(), strict=True):
            seen.add((tok.decode(src), tok.decode([t for t in tgt if t >= 0])))
    assert seen == set(splits.train) | set(splits.valid)
    test_sides = {s for s, _ in splits.test} | {t for _, t in splits.test}
    assert not test_sides & ({s for s, _ in seen} | {t for _, t in seen})


def test_token_batches_respect_the_budget_and_cover_each_pair_once_per_epoch():
    src = [[5] * n + [2] for n in range(1, 40)] * 3
    tgt = [[6] * (n % 7 + 1) + [2] for n in range(len(src))]
    batches = TokenBatches(src, tgt, 64, seed=1)
    rows = 0
    for i in range(len(batches)):
        b = batches.batch(i)
        assert b.src.numel() <= 64 and b.tgt_in.numel() <= 64
        rows += b.src.shape[0]
        assert torch.equal(b.src_mask, b.src != 0) and torch.equal(b.tgt_mask, b.tgt_out != -100)
    assert rows == len(src)
    assert torch.equal(batches.batch(3).src, TokenBatches(src, tgt, 64, seed=1).batch(3).src)  # pure in the index
    with pytest.raises(ValueError, match="raise --batch-tokens to at least 40"):
        TokenBatches(src, tgt, 30)


# -- masks on both sides ----------------------------------------------------------------------------------------
def _small_transformer(**overrides) -> Transformer:
    torch.manual_seed(0)
    config = ModelConfig.preset("vaswani-base", **{**dict(vocab_size=40, d_model=32, n_heads=4, d_ff=64, dropout=0.0,
                                                          n_encoder_layers=2, n_decoder_layers=2, max_seq_len=32),
                                                     **overrides})
    return Transformer(config).eval()


@settings(max_examples=12)
@given(st.lists(st.integers(1, 12), min_size=2, max_size=5), st.integers(0, 2**16))
def test_padding_tokens_of_the_source_never_change_the_translation(lengths, seed):
    net = _small_transformer()
    g = torch.Generator().manual_seed(seed)
    rows = [torch.randint(3, 40, (n,), generator=g).tolist() + [2] for n in lengths]
    targets = [torch.randint(3, 40, (4,), generator=g).tolist() + [2] for _ in lengths]
    batch = pad_batch(rows, targets)
    noisy = batch.src.masked_scatter(~batch.src_mask, torch.randint(3, 40, batch.src.shape, generator=g))
    logits = net(batch.src, batch.tgt_in, batch.src_mask, batch.tgt_mask)
    noisy_logits = net(noisy, batch.tgt_in, batch.src_mask, batch.tgt_mask)
    torch.testing.assert_close(logits, noisy_logits)
    for beams in (1, 3):
        kwargs = dict(num_beams=beams, bos_token_id=1, eos_token_id=2, max_new_tokens=8)
        assert (generate_seq2seq(net, batch.src, batch.src_mask, **kwargs)
                == generate_seq2seq(net, noisy, batch.src_mask, **kwargs))
    alone = [generate_seq2seq(net, [r], num_beams=1, bos_token_id=1, eos_token_id=2, max_new_tokens=8)[0]
             for r in rows]
    assert alone == generate_seq2seq(net, batch.src, batch.src_mask, num_beams=1, bos_token_id=1, eos_token_id=2,
                                     max_new_tokens=8)


@settings(max_examples=25)
@given(st.integers(1, 9), st.integers(0, 2**16))
def test_the_decoder_never_sees_future_target_tokens(t, seed):
    net = _small_transformer()
    g = torch.Generator().manual_seed(seed)
    batch = pad_batch([torch.randint(3, 40, (6,), generator=g).tolist() + [2] for _ in range(3)],
                      [torch.randint(3, 40, (n,), generator=g).tolist() + [2] for n in (9, 4, 6)])
    changed = batch.tgt_in.clone()
    changed[:, t:] = torch.randint(3, 40, changed[:, t:].shape, generator=g)
    before = net(batch.src, batch.tgt_in, batch.src_mask, batch.tgt_mask)
    after = net(batch.src, changed, batch.src_mask, batch.tgt_mask)
    torch.testing.assert_close(before[:, :t], after[:, :t])
    assert not torch.allclose(before[:, t:], after[:, t:])


# -- vocabulary and BLEU ----------------------------------------------------------------------------------------
def test_test_references_survive_the_tokenizer_and_score_bleu_100():
    splits = split_by_source(read_parallel(FRA).pairs)
    tok = train_shared_bpe(splits.train[::8], vocab_size=1000)  # a training subset: quicker, same mechanism
    assert [tok.pad_id, tok.bos_id, tok.eos_id] == [PAD, BOS, EOS]
    sources, references = references_by_source(splits.test)
    round_trip = [tok.decode(ids) for ids in tok.encode_batch([refs[0] for refs in references])]
    assert round_trip == [refs[0] for refs in references]  # nothing lost: accents, "\u202f!", apostrophes
    bleu, chrf, signature = corpus_scores(round_trip, references)
    assert bleu == pytest.approx(100.0) and chrf == pytest.approx(100.0) and "tok:13a" in signature
    assert corpus_scores(["Il fait beau."], [["Il pleut.", "Il fait beau."]])[0] == pytest.approx(100.0)


def test_vocabulary_is_nfc_normalised_and_keeps_accents():
    tok = train_shared_bpe([("cafe", "café"), ("Élan", "élan")] * 20, vocab_size=300)
    assert tok.decode(tok.encode("cafe\u0301")) == "café"  # combining accent → the precomposed letter
    assert tok.decode(tok.encode("Où êtes-vous ? Ça va !")) == "Où êtes-vous ? Ça va !"


def test_a_sentence_longer_than_the_context_is_an_error_not_a_cut():
    net = _small_transformer(max_seq_len=8)
    tok = train_shared_bpe([("a b c", "d e f")] * 5, vocab_size=270)
    with pytest.raises(ValueError, match="sentence 2 is .* tokens long .* max_seq_len=8"):
        translate(net, tok, ["a", "a b c a b c a b c"], beam=1)
    src, tgt, dropped = encode_pairs(tok, [("a", "b"), ("a b c a b c a b c", "d")], max_len=8)
    assert dropped == 1 and len(src) == len(tgt) == 1


# -- the command line -------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A two-step translation run through `qkv train` on 1,500 Tatoeba pairs: the files every command reads."""
    from qkv.cli import main

    root = tmp_path_factory.mktemp("translate")
    with zipfile.ZipFile(FRA) as archive:
        lines = archive.read("fra.txt").decode().splitlines()[30_000:31_500]
    data = root / "pairs.tsv"
    data.write_text("\n".join(lines) + "\nno tab on this line\n")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        code = main(["train", "vaswani-small", "--data", str(data), "--out", str(root / "run"), "--d-model", "32",
                     "--d-ff", "64", "--n-encoder-layers", "1", "--n-decoder-layers", "1", "--vocab-size", "400",
                     "--max-steps", "2", "--test-size", "30", "--valid-size", "10", "--batch-tokens", "512",
                     "--no-progress"])
    finally:
        torch.set_num_threads(threads)
    assert code == 0
    return root


def test_qkv_train_translate_and_eval_bleu_work_end_to_end(tiny_run, capsys, monkeypatch):
    import io

    from qkv.cli import main

    run = str(tiny_run / "run")
    assert main(["translate", "--checkpoint", run, "--beam", "2", "Hello.", "Where is it?"]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 2
    monkeypatch.setattr("sys.stdin", io.StringIO("I am here.\n\nGo on.\n"))
    assert main(["translate", "--checkpoint", run, "--beam", "1"]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 3  # one line out per line in, blank stays blank
    report = tiny_run / "bleu.json"
    assert main(["eval", "--checkpoint", run, "--bleu", "--limit", "6", "--samples", "2", "--report",
                 str(report)]) == 0
    out = capsys.readouterr().out
    assert "greedy: BLEU" in out and "beam 4 (alpha 0.6): BLEU" in out and out.count("  EN  ") == 2
    import json

    saved = json.loads(report.read_text())
    assert [s["beam"] for s in saved["scores"]] == [1, 4] and len(saved["translations"]) == 6


def test_the_trainers_validation_loss_is_the_one_qkv_eval_gives_though_it_trains_label_smoothed(tiny_run):
    """One checkpoint, one validation loss: the recipe trains with label smoothing 0.1, and the validation loss its
    trainer reports (history, metrics.csv, hence the `done:` line) is plain cross-entropy, the number `qkv eval`
    gives for the same checkpoint and split; its perplexity is exp of it."""
    import csv
    import json

    from qkv.evaluation import evaluate_checkpoint

    run = tiny_run / "run"
    state = json.loads((run / (run / "latest").read_text().strip() / "trainer_state.json").read_text())
    assert state["train_config"]["label_smoothing"] == 0.1
    evaluated = evaluate_checkpoint(run)
    assert state["history"][-1]["val_loss"] == pytest.approx(evaluated["loss"], rel=1e-6)
    last = list(csv.DictReader((run / "metrics.csv").open()))[-1]
    assert float(last["val_loss"]) == pytest.approx(evaluated["loss"], rel=1e-6)
    assert float(last["val_ppl"]) == pytest.approx(evaluated["perplexity"], rel=1e-5)
    assert float(last["label_smoothing"]) == 0.1  # the train_loss beside it is the smoothed objective


def test_translation_commands_explain_user_errors(tiny_run, tmp_path, capsys):
    from qkv.cli import main

    assert main(["train", "vaswani-small", "--max-steps", "1"]) == 2
    assert "trains on a parallel file; pass --data" in capsys.readouterr().err
    bad = tmp_path / "bad.tsv"
    bad.write_text("no tabs\nat all\n")
    assert main(["train", "vaswani-small", "--data", str(bad), "--out", str(tmp_path / "r")]) == 2
    assert "no usable sentence pair" in capsys.readouterr().err
    assert main(["translate", "--checkpoint", str(tmp_path / "missing"), "Hi."]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_a_translation_run_resumes_exactly(tiny_run, tmp_path):
    """2 steps + `qkv train --resume` for 2 more give the weights of 4 uninterrupted steps."""
    import shutil

    from safetensors.torch import load_file

    from qkv.cli import main

    args = ["train", "vaswani-small", "--data", str(tiny_run / "pairs.tsv"), "--d-model", "32", "--d-ff", "64",
            "--n-encoder-layers", "1", "--n-decoder-layers", "1", "--vocab-size", "400", "--test-size", "30",
            "--valid-size", "10", "--batch-tokens", "512", "--no-progress", "--eval-every", "2"]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main([*args, "--max-steps", "4", "--out", str(tmp_path / "straight")]) == 0
        assert main([*args, "--max-steps", "2", "--out", str(tmp_path / "split")]) == 0
        assert main(["train", "--resume", str(tmp_path / "split"), "--max-steps", "4", "--no-progress"]) == 0
    finally:
        torch.set_num_threads(threads)
    straight = load_file(str(tmp_path / "straight" / "step-000004" / "model.safetensors"))
    resumed = load_file(str(tmp_path / "split" / "step-000004" / "model.safetensors"))
    assert straight.keys() == resumed.keys()
    for name in straight:
        torch.testing.assert_close(straight[name], resumed[name], rtol=0, atol=0)
    shutil.rmtree(tmp_path)


def test_checkpoint_averaging_is_the_mean_of_the_newest_weights(tiny_run, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    from qkv.translation import average_checkpoints

    run = tmp_path / "run"
    shutil.copytree(tiny_run / "run", run)
    newest = sorted(run.glob("step-*"))[-1]
    weights = load_file(str(newest / "model.safetensors"))
    older = run / "step-000001"
    shutil.copytree(newest, older)
    save_file({k: 3 * v for k, v in weights.items()}, str(older / "model.safetensors"))
    with pytest.raises(ValueError, match=r"step-000001/model.safetensors is damaged: use an earlier checkpoint"):
        average_checkpoints(run, 2)  # its manifest recorded other bytes: averaging checks every file it reads
    (older / "manifest.json").unlink()  # a checkpoint without a manifest is read without the check
    model, _, steps = average_checkpoints(run, 2)
    assert steps == [older, newest]
    for name, value in model.state_dict().items():
        torch.testing.assert_close(value, 2 * weights[name])
    with pytest.raises(ValueError, match="fewer than --average 3"):
        average_checkpoints(run, 3)
