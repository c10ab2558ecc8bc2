"""Word-piece output units (modeling_uot_ctc/word_pieces.py): the vocabulary, the encoding, the stock tokenizer's
decoding of it, the anchor's columns, and a training run of the script with them."""

import json
import os

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer, Wav2Vec2CTCTokenizer, Wav2Vec2ForCTC, pipeline

import run_speech_recognition_uot as script
from modeling_uot_ctc.costs import character_anchor_cost
from modeling_uot_ctc.data import token_characters
from modeling_uot_ctc.word_pieces import (
    WordPieceUnits,
    anchor_units,
    is_word_piece_vocabulary,
    piece_spelling,
    word_piece_vocabulary,
)
from script_fixtures import base_arguments, speech_like


class FixedPieces:
    """A stand-in teacher tokenizer: each word split as the table says (WordPiece's `##` marks)."""

    table = {"the": ["the"], "cats": ["cat", "##s"], "sat": ["sat"], "cat": ["cat"], "sing": ["sin", "##g"],
             "hats": ["hat", "##s"]}

    def tokenize(self, text):
        return [piece for word in text.split() for piece in self.table[word]]


def stock_tokenizer(vocab, folder):
    path = os.path.join(folder, "vocab.json")
    with open(path, "w") as handle:
        json.dump(vocab, handle)
    return Wav2Vec2CTCTokenizer(path, unk_token="[UNK]", pad_token="[PAD]", word_delimiter_token="|",
                                bos_token=None, eos_token=None)


def test_the_vocabulary_keeps_the_most_frequent_pieces_and_every_character():
    texts = ["the cats sat", "the cat sat", "the hats"]
    # Spellings counted by hand: the 3, sat 2, cat 2, s 2 (a continuation, one character), hat 1.
    vocab = word_piece_vocabulary(texts, FixedPieces(), size=12)
    characters = ["a", "c", "e", "h", "s", "t"]
    assert list(vocab)[:3] == ["[PAD]", "[UNK]", "|"]
    assert list(vocab)[3:9] == characters
    # 12 entries: 3 special, 6 characters, then "the" (3), then "cat" and "sat" (2 each, alphabetical); no "hat".
    assert list(vocab)[9:] == ["the", "cat", "sat"] and len(vocab) == 12
    assert list(vocab.values()) == list(range(len(vocab)))
    with pytest.raises(ValueError, match="special tokens and single characters"):
        word_piece_vocabulary(texts, FixedPieces(), size=5)


def test_words_are_spelled_longest_unit_first_with_delimiters_between_them():
    vocab = {u: i for i, u in enumerate(["[PAD]", "[UNK]", "|", "a", "c", "s", "t", "h", "e", "ca", "cat", "the"])}
    units = WordPieceUnits(vocab)
    assert units.tokenize("the cats") == ["the", "|", "cat", "s"]
    assert units.tokenize("tacs") == ["t", "a", "c", "s"]  # no unit longer than one character starts "ta"
    assert units.encode("the cats") == [11, 2, 10, 5]
    assert units.encode("the dog") == [11, 2, 1]  # WordPiece writes an unspellable word as one unknown unit
    assert units.units_of("##cat") == [10] and units.units_of("cats") == [10, 5] and piece_spelling("##s") == "s"
    # A piece the units cannot spell reads its known characters, never the unknown unit, which no label holds.
    assert units.units_of("[UNK]") == [] and units.units_of("cax") == [4, 3]


def test_the_stock_tokenizer_decodes_the_labels_and_ctc_output(tmp_path):
    vocab = {u: i for i, u in enumerate(["[PAD]", "[UNK]", "|", "a", "c", "s", "t", "h", "e", "cat", "the"])}
    tokenizer = stock_tokenizer(vocab, str(tmp_path))
    assert is_word_piece_vocabulary(tokenizer)
    units = WordPieceUnits.from_tokenizer(tokenizer)
    labels = units.encode("the cats sat")
    assert tokenizer.decode(labels, group_tokens=False) == "the cats sat"
    # CTC output: repeats merged, blanks (the padding id) dropped, the delimiter a space.
    frames = [10, 10, 0, 2, 9, 0, 9, 5, 2, 2, 5, 3, 6, 0]
    assert tokenizer.decode(frames) == "the catcats sat"
    # The stock encoder loses the word boundary, which is why labels come from WordPieceUnits.
    assert tokenizer("the cats").input_ids != labels[:4]
    characters = stock_tokenizer({u: i for i, u in enumerate(["[PAD]", "[UNK]", "|", "a", "b"])}, str(tmp_path))
    assert not is_word_piece_vocabulary(characters) and anchor_units(characters) is None


def test_the_anchor_reads_a_piece_unit_posterior_directly(tmp_path):
    vocab = {u: i for i, u in enumerate(["[PAD]", "[UNK]", "|", "a", "c", "s", "t", "h", "e", "cat", "the"])}
    units_of = anchor_units(stock_tokenizer(vocab, str(tmp_path)))
    table = token_characters([["the", "cat", "##s"], ["hat"]], vocab, 3, units_of)
    assert table[0, 0].nonzero().flatten().tolist() == [10]  # "the" is a unit: its column alone
    assert table[0, 2].nonzero().flatten().tolist() == [5]  # "##s" is the unit "s"
    assert sorted(table[1, 0].nonzero().flatten().tolist()) == [3, 6, 7]  # "hat" is spelled h, a, t
    assert table[1, 1:].sum() == 0
    # The cost against a direct evaluation of 1 - max over each piece's units of the frame's posterior.
    generator = torch.Generator().manual_seed(0)
    log_probs = torch.randn(2, 7, len(vocab), generator=generator).log_softmax(-1)
    cost = character_anchor_cost(log_probs, table)
    probs = log_probs.exp()
    for b, t, j in [(0, 0, 0), (0, 3, 2), (1, 6, 0), (1, 2, 0)]:
        ids = table[b, j].nonzero().flatten()
        assert cost[b, t, j].item() == pytest.approx(1 - probs[b, t, ids].max().item(), abs=1e-6)
    assert torch.all(cost[1, :, 1:] == 1.0)  # a padded token without units costs 1 (no masks given)


def test_the_anchor_without_any_unit_or_example_still_has_its_shape_and_gradient():
    log_probs = torch.randn(2, 5, 6).log_softmax(-1).requires_grad_()
    cost = character_anchor_cost(log_probs, torch.zeros(2, 3, 6))
    assert cost.shape == (2, 5, 3) and torch.all(cost == 1.0)
    cost.sum().backward()  # a graph to differentiate, with nothing in it to push
    assert torch.all(log_probs.grad == 0)
    assert character_anchor_cost(torch.zeros(0, 5, 6), torch.zeros(0, 3, 6)).shape == (0, 5, 3)


def test_a_run_with_word_piece_units_trains_the_anchor_and_exports_a_stock_recogniser(corpus, teacher, tmp_path):
    output_dir, plain = str(tmp_path / "out"), str(tmp_path / "plain")
    script.main(base_arguments(
        corpus, teacher, output_dir, output_units="word_pieces", word_piece_vocab_size=30, max_steps=2,
        alignment_anchor_weight=0.5, plain_model_dir=plain,
    ))
    vocab = json.load(open(os.path.join(output_dir, "vocab.json")))
    # The tiny teacher's pieces are whole words; 30 entries leave room for the most frequent ones.
    assert "the" in vocab and len([u for u in vocab if len(u) > 1 and not u.startswith("[")]) >= 5
    for folder in (output_dir, plain):
        assert json.load(open(os.path.join(folder, "tokenizer_config.json")))["tokenizer_class"] == \
            "Wav2Vec2CTCTokenizer"
    loaded = AutoTokenizer.from_pretrained(plain)
    assert WordPieceUnits.from_tokenizer(loaded).tokenize("the air is clean")[:2] == ["the", "|"]
    history = json.load(open(os.path.join(output_dir, "trainer_state.json")))["log_history"]
    assert [entry["step"] for entry in history if "kt_loss" in entry] == [1, 2]
    # The stock pipeline serves the export: its text is the stock tokenizer's CTC decoding of the model's output.
    audio = speech_like("the air is clean", np.random.default_rng(0))
    asr = pipeline("automatic-speech-recognition", model=plain, device=-1)
    model = Wav2Vec2ForCTC.from_pretrained(plain).eval()
    inputs = asr.feature_extractor(audio, sampling_rate=16_000, return_tensors="pt")
    with torch.no_grad():
        best = model(inputs.input_values).logits.argmax(-1)[0]
    assert type(asr.tokenizer) is Wav2Vec2CTCTokenizer
    assert asr(audio)["text"] == loaded.decode(best.tolist())


def test_the_script_encodes_word_piece_labels_that_decode_to_the_transcript(corpus, teacher, tmp_path):
    model_args, data_args, transfer_args, _, _ = script.parse_arguments(base_arguments(
        corpus, teacher, str(tmp_path / "out"), output_units="word_pieces", word_piece_vocab_size=30,
    ))
    import datasets

    texts = ["the air is clean", "the cat sat down", "the sun is up"]
    raw = datasets.DatasetDict({"train": datasets.Dataset.from_dict({"normalised_text": texts})})
    tokenizer = script.build_tokenizer(raw, model_args, data_args, transfer_args, str(tmp_path))
    units = WordPieceUnits.from_tokenizer(tokenizer)
    for text in texts:
        labels = units.encode(text)
        assert tokenizer.decode(labels, group_tokens=False) == text
    assert units.tokenize("the cat")[0] == "the"  # the most frequent piece is a unit
    evaluation_only = datasets.DatasetDict({"eval": raw["train"]})
    with pytest.raises(ValueError, match="from the training text"):
        script.build_tokenizer(evaluation_only, model_args, data_args, transfer_args, str(tmp_path))
    data_args.output_units = "phonemes"
    with pytest.raises(ValueError, match="--output_units"):
        script.build_tokenizer(raw, model_args, data_args, transfer_args, str(tmp_path))


def test_an_n_gram_language_model_is_refused_with_word_piece_units(corpus, teacher, tmp_path):
    with pytest.raises(ValueError, match="character vocabularies only"):
        script.main(base_arguments(corpus, teacher, str(tmp_path / "out"), output_units="word_pieces",
                                   lm_text="train"))
