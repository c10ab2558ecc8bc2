"""The n-gram language model: estimated by KenLM from text at test time, stored in the Hub's layout, read back, and
fixing in beam search a spelling that greedy decoding gets wrong."""

import itertools
import json
import os
import shutil

import kenlm
import numpy as np
import pytest
from transformers import Wav2Vec2CTCTokenizer

from modeling_uot_ctc.language_model import (
    build_language_model,
    choose_weights,
    decode,
    decoder_labels,
    estimate_ngram,
    has_language_model,
    load_decoder,
    store_weights,
    text_without,
)
from modeling_uot_ctc.transcribe import greedy

CHARACTERS = "abcdefghijklmnopqrstuvwxyz'"
TEXT = ["the cat sat on the mat"] * 30 + ["a dog ran to the park", "she saw her friend at school"] * 10


def make_tokenizer(folder, characters=CHARACTERS):
    """A character CTC tokenizer as the training script builds one: padding (the blank), unknown, delimiter."""
    vocab = {"[PAD]": 0, "[UNK]": 1, "|": 2, **{c: i + 3 for i, c in enumerate(characters)}}
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "vocab.json"), "w") as handle:
        json.dump(vocab, handle)
    tokenizer = Wav2Vec2CTCTokenizer(
        os.path.join(folder, "vocab.json"), unk_token="[UNK]", pad_token="[PAD]", word_delimiter_token="|",
        bos_token=None, eos_token=None,
    )
    tokenizer.save_pretrained(folder)
    return tokenizer


def emissions(tokenizer, text, confusions, floor=1e-3):
    """Log-probabilities of a CTC model that says `text` one character a frame, a blank between, sure of every
    character but those in `confusions` (position: (chosen, other, probability of chosen)); every other label gets
    `floor` before normalisation."""
    vocab = tokenizer.get_vocab()
    rows = []
    for position, character in enumerate(text.replace(" ", "|")):
        p = np.full(len(vocab), floor)
        if position in confusions:
            chosen, other, share = confusions[position]
            p[vocab[chosen]], p[vocab[other]] = share, 1 - share
        else:
            p[vocab[character]] = 0.95
        blank = np.full(len(vocab), floor)
        blank[vocab["[PAD]"]] = 0.95
        rows += [p / p.sum(), blank / blank.sum()]
    return np.log(np.array(rows, dtype=np.float32))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("model"))
    tokenizer = make_tokenizer(folder)
    build_language_model(TEXT, folder, tokenizer, order=3)
    return folder, tokenizer


def test_the_folder_holds_the_hubs_layout_and_a_kenlm_model_of_the_text(model_dir):
    folder, tokenizer = model_dir
    assert has_language_model(folder)
    assert sorted(os.listdir(os.path.join(folder, "language_model"))) == ["3gram.bin", "attrs.json", "unigrams.txt"]
    labels = json.load(open(os.path.join(folder, "alphabet.json")))["labels"]
    assert labels[0] == "" and labels[2] == " " and labels[3:] == list(CHARACTERS)  # blank, then space for "|"
    unigrams = open(os.path.join(folder, "language_model", "unigrams.txt")).read().split()
    assert sorted(unigrams) == sorted({w for line in TEXT for w in line.split()})
    model = kenlm.Model(os.path.join(folder, "language_model", "3gram.bin"))
    assert model.order == 3
    assert model.score("the cat sat on the mat") > model.score("the cat sat on the mad")


# "mat" heard as "cat" by a small margin: both are words the text has, so only the context can tell.
SAID = "the cat sat on the mat"
HEARD_WRONG = {len(SAID) - 3: ("c", "m", 0.6)}


def test_beam_search_fixes_a_spelling_that_greedy_decoding_gets_wrong(model_dir):
    folder, tokenizer = model_dir
    scores = emissions(tokenizer, SAID, HEARD_WRONG)
    assert greedy(tokenizer, [scores]) == ["the cat sat on the cat"]
    decoder = load_decoder(folder, tokenizer)
    assert decode(decoder, [scores]) == [SAID]
    # The language model is what fixes it: without its weight the search agrees with greedy decoding.
    decoder.reset_params(alpha=0.0, beta=0.0)
    assert decode(decoder, [scores]) == ["the cat sat on the cat"]


def test_weights_are_chosen_by_wer_and_stored_with_the_model(model_dir, tmp_path):
    folder, tokenizer = model_dir
    scores = [emissions(tokenizer, SAID, HEARD_WRONG), emissions(tokenizer, "a dog ran", {})]
    decoder = load_decoder(folder, tokenizer)
    choice = choose_weights(decoder, scores, [SAID, "a dog ran"], alphas=(0.0, 0.5), betas=(0.0, 1.0))
    assert choice["grid"][(0.0, 0.0)] == pytest.approx(1 / 9)  # one word of nine wrong without the LM
    assert choice["grid"][(0.5, 0.0)] == 0.0
    assert (choice["alpha"], choice["beta"], choice["wer"]) == (0.5, 0.0, 0.0)  # the smallest weights that fix it
    assert decode(decoder, scores[:1]) == [SAID]  # the decoder keeps the choice
    copy = tmp_path / "copy"
    shutil.copytree(folder, copy)
    store_weights(str(copy), 1.25, 0.75)
    reloaded = load_decoder(str(copy), tokenizer)
    assert reloaded._language_model.alpha == 1.25 and reloaded._language_model.beta == 0.75


def test_a_decoder_for_another_vocabulary_is_refused(model_dir, tmp_path):
    folder, _ = model_dir
    other = make_tokenizer(str(tmp_path / "other"), characters="abcdefghijklmnopqrstuvwxyz")  # no apostrophe
    with pytest.raises(ValueError, match="built for another vocabulary"):
        load_decoder(folder, other)


def test_missing_files_and_tools_give_clear_errors(model_dir, tmp_path, monkeypatch):
    _, tokenizer = model_dir
    with pytest.raises(FileNotFoundError, match="holds no language model"):
        load_decoder(str(tmp_path), tokenizer)
    os.makedirs(tmp_path / "language_model")
    (tmp_path / "alphabet.json").write_text(json.dumps({"labels": decoder_labels(tokenizer), "is_bpe": False}))
    with pytest.raises(FileNotFoundError, match="no KenLM model"):
        load_decoder(str(tmp_path), tokenizer)
    monkeypatch.setenv("PATH", "")
    monkeypatch.setattr("sys.executable", str(tmp_path / "python"))
    with pytest.raises(FileNotFoundError, match="install_kenlm.sh"):
        estimate_ngram(["a b c"], str(tmp_path / "lm.bin"))


def test_text_the_recogniser_cannot_spell_is_left_out(tmp_path):
    tokenizer = make_tokenizer(str(tmp_path))
    with pytest.raises(ValueError, match="spelled with the tokenizer's characters"):
        build_language_model(["Capitals and digits 42"], str(tmp_path), tokenizer)
    build_language_model(["the cat", "the cat", "Not This One", "a dog"], str(tmp_path), tokenizer, order=2)
    unigrams = open(tmp_path / "language_model" / "unigrams.txt").read().split()
    assert sorted(unigrams) == ["a", "cat", "dog", "the"]


def test_emissions_helper_is_what_the_tests_say(tmp_path):
    tokenizer = make_tokenizer(str(tmp_path))
    scores = emissions(tokenizer, "ab", {})
    ids = [k for k, _ in itertools.groupby(scores.argmax(-1)) if k != 0]
    assert tokenizer.convert_ids_to_tokens(ids) == ["a", "b"]
    assert np.allclose(np.exp(scores).sum(-1), 1.0, atol=1e-5)


def test_text_without_leaves_out_the_held_out_sentences():
    text = text_without(
        ["The cat sat.", "A dog ran!", "the cat sat", "Birds sing.", "?!"], held_out=["A dog ran."],
        chars_to_ignore=[".", "!", "?"],
    )
    assert text == ["the cat sat", "the cat sat", "birds sing"]
