"""The homophone target: sets espeak-ng speaks alike in every target voice, their sentences, a disjoint split."""

import os
import re

import pytest

from modeling_uot_ctc.corpus import WORDNET_DIRS, WORDNET_FILES, clean_sentences, plan_corpus, wordnet_sentences
from modeling_uot_ctc.data import normalise_text
from modeling_uot_ctc.homophones import (
    CANDIDATE_SETS,
    CHARS_TO_IGNORE,
    compare_sets,
    corpus_order,
    expand_voices,
    homophone_positions,
    homophone_sentences,
    homophone_sets,
    main,
    mark_corpus,
    phonemes,
    split_homophone_sentences,
)

TARGET = expand_voices("target")
HAS_WORDNET = any(os.path.isfile(os.path.join(folder, WORDNET_FILES[0])) for folder in WORDNET_DIRS)


def normalised(text):
    return normalise_text(text, list(CHARS_TO_IGNORE))


@pytest.fixture(scope="module")
def target_sets():
    return homophone_sets("target")


def test_candidates_are_many_lower_case_word_sets():
    assert len(CANDIDATE_SETS) >= 60
    for candidate in CANDIDATE_SETS:
        assert len(candidate) >= 2 and len(set(candidate)) == len(candidate)
        assert all(re.fullmatch("[a-z]+", word) for word in candidate)


def test_every_kept_set_is_spoken_alike_by_every_target_voice(target_sets):
    assert len(TARGET) == 9 and len(target_sets) >= 20
    words = [word for members in target_sets for word in members]
    assert len(words) == len(set(words))  # a word belongs to one set
    for voice in TARGET:
        spoken = dict(zip(words, phonemes(words, voice)))
        for members in target_sets:
            assert len({spoken[word] for word in members}) == 1, (voice, members, [spoken[w] for w in members])
            assert spoken[members[0]]  # not an empty string that would match anything


def test_words_that_sound_different_are_not_kept():
    kept = homophone_sets("target", [("cat", "cut"), ("right", "write", "wrote"), ("ship", "sheep")])
    assert kept == [("right", "write")]
    # The check compares espeak-ng's phoneme names, which keep apart what IPA may merge.
    assert phonemes(["cat"], "en-us-nyc") != phonemes(["cut"], "en-us-nyc")


def test_a_set_is_dropped_when_one_accent_tells_its_words_apart():
    # en-gb-scotland keeps "wh" (w#) apart from "w"; the Caribbean and New York voices do not.
    for pair in (("which", "witch"), ("whether", "weather")):
        assert homophone_sets(["en-029+f4", "en-us-nyc+klatt2"], [pair]) == [pair]
        assert homophone_sets(TARGET, [pair]) == []
        entry = compare_sets(TARGET, [pair])[0]
        assert entry["dropped"] == list(pair)
        assert entry["phonemes"]["en-gb-scotland+f4"][pair[0]] != entry["phonemes"]["en-gb-scotland+f4"][pair[1]]
    # The other way round: en-us-nyc says "route" as "rout", the others as "root".
    assert homophone_sets(["en-gb-scotland+f4", "en-029+klatt4"], [("root", "route")]) == [("root", "route")]
    assert homophone_sets(TARGET, [("root", "route")]) == []
    # A voice variant changes the sound, not the phonemes.
    words = ["which", "weather", "night", "their"]
    assert phonemes(words, "en-gb-scotland+f4") == phonemes(words, "en-gb-scotland+klatt2") == phonemes(
        words, "en-gb-scotland"
    )


def test_unknown_voice_is_refused():
    with pytest.raises(ValueError, match="no voice"):
        phonemes(["night"], "xx-nowhere")


def test_sentence_positions_need_the_same_phonemes_in_context():
    sentences = [
        "I have read the book",  # espeak-ng reads "have read" as "red": "reed" would sound different here
        "we saw the knight at dawn",
        "The Knight, at dawn - rode home.",  # the lone dash is not a word of the transcript
        "put it in the box",  # "in" is unstressed here, "inn" is not
        "I walked to the inn",
        "the wind blew all night",
        "nothing to see there",
    ]
    sets = [("read", "reed"), ("knight", "night"), ("in", "inn"), ("blue", "blew")]
    by_spelling = homophone_sentences(sentences, sets)
    assert [p for _, p in by_spelling] == [(2,), (3,), (1,), (2,), (4,), (2, 4)]
    assert homophone_sentences(sentences, sets, voices="target") == [
        ("we saw the knight at dawn", (3,)),
        ("The Knight, at dawn - rode home.", (1,)),
        ("I walked to the inn", (4,)),
        ("the wind blew all night", (2, 4)),
    ]
    assert homophone_positions("The Knight, at dawn - rode home.", sets) == [1]


def test_split_shares_no_sentence_and_covers_every_set():
    sets = [("knight", "night"), ("sea", "see"), ("wait", "weight")]
    sentences = [
        "the knight rode away", "we slept all night", "a knight in armour", "the night was cold",
        "the sea was calm", "I see the boats", "please wait for me", "the weight of the box",
        "They slept all night.", "the sea is deep", "wait here please", "a cold night",
    ]
    items = homophone_sentences(sentences, sets)
    assert len(items) == 12
    split = split_homophone_sentences(items, sets, test_size=4, seed=1)
    train, test = ([normalised(s) for s, _ in split[part]] for part in ("train", "test"))
    assert len(test) == 4 and len(train) == 8 and not set(train) & set(test)
    for members in sets:
        for part in (train, test):
            assert any(set(members) & set(sentence.split()) for sentence in part), (members, part)
    assert split == split_homophone_sentences(items, sets, test_size=4, seed=1)
    duplicated = items + [("The knight rode away!", (1,))]
    assert split_homophone_sentences(duplicated, sets, test_size=4, seed=1) == split


def test_corpus_builder_reproduces_the_split(tmp_path):
    train = [f"the knight number {w} rode away" for w in ("one", "two", "three", "four", "five", "six")]
    test = [f"the night number {w} was cold" for w in ("one", "two", "three")]
    ordered = corpus_order(train, test, seed=5)
    path = tmp_path / "sentences.txt"
    path.write_text("".join(line + "\n" for line in ordered))
    with open(path) as handle:
        assert clean_sentences(handle) == ordered  # what --sentences reads, in this order
    for k in (6, 2):
        plan = plan_corpus(ordered, len(test) + k, seed=5, test_fraction=len(test) / (len(test) + k), voices="target")
        assert [u.text for u in plan if u.split == "test"] == test
        assert [u.text for u in plan if u.split == "train"] == train[:k]


def test_cli_writes_sentences_sets_and_positions(tmp_path, capsys):
    import json

    pool = tmp_path / "pool.txt"
    pool.write_text("\n".join([
        "the knight rode away", "we slept all night", "a knight in armour", "the night was cold",
        "the sea was calm", "I see the boats", "the weight of the box", "please wait for me", "no homophone in here",
    ]))
    main(["--sentences", str(pool), "--output", str(tmp_path / "out"), "--test", "3", "--train", "5"])
    printed = capsys.readouterr().out
    assert "homophone sets kept" in printed and "share of test sentences with a homophone: 1.000" in printed
    summary = json.loads((tmp_path / "out" / "homophones.json").read_text())
    assert len(summary["test"]) == 3 and len(summary["train"]) == 5
    assert ["knight", "night"] in summary["sets"] and ["sea", "see"] in summary["sets"]
    assert "which / witch" in summary["dropped"]
    members = {w for s in summary["sets"] for w in s}
    for row in summary["train"] + summary["test"]:
        assert row["positions"] and all(row["normalised"].split()[p] in members for p in row["positions"])
    lines = (tmp_path / "out" / "sentences.txt").read_text().splitlines()
    assert sorted(lines) == sorted(r["text"] for r in summary["train"] + summary["test"])


@pytest.mark.skipif(not HAS_WORDNET, reason="WordNet's data files (Debian's wordnet-base) are not installed")
def test_wordnet_homophone_split(target_sets):
    pool = wordnet_sentences()[:6000]  # a slice keeps the context check (every sentence in nine voices) quick
    items = homophone_sentences(pool, target_sets, voices="target")
    split = split_homophone_sentences(items, target_sets, test_size=150, seed=0)
    train, test = split["train"], split["test"]
    assert len(test) == 150 and len(train) == len(items) - 150
    assert not {normalised(s) for s, _ in train} & {normalised(s) for s, _ in test}
    assert sum(bool(p) for _, p in test) >= len(test) / 3
    member_of = {w: i for i, members in enumerate(target_sets) for w in members}

    def sets_in(part):
        return {member_of[normalised(s).split()[p]] for s, positions in part for p in positions}

    holders = {}
    for sentence, positions in items:
        for s in {member_of[normalised(sentence).split()[p]] for p in positions}:
            holders[s] = holders.get(s, 0) + 1
    assert sets_in(train) & sets_in(test) == {s for s, n in holders.items() if n >= 2}
    assert len(sets_in(test)) >= 20
    # Each position swapped for the other members of its set: the same phonemes, voice by voice.
    checked = 0
    for sentence, positions in test:
        for p in positions:
            word = normalised(sentence).split()[p]
            if normalised(sentence).split().count(word) > 1 or checked >= 15:
                continue  # a plain text swap would not know which occurrence is meant
            checked += 1
            others = [w for w in target_sets[member_of[word]] if w != word]
            swapped = [re.sub(rf"\b{word}\b", w, sentence, count=1, flags=re.IGNORECASE) for w in others]
            for voice in TARGET[::3]:
                spoken = phonemes([sentence, *swapped], voice)
                assert len(set(spoken)) == 1, (sentence, word, voice, spoken)
    assert checked == 15


def test_the_corpus_metadata_marks_the_homophones_and_padding_keeps_them(tmp_path):
    import csv
    import json

    import numpy as np
    import soundfile

    from modeling_uot_ctc.corpus import pad_corpus, read_corpus

    corpus = tmp_path / "corpus"
    texts = {"train": ["The knight rode away.", "no such word here"], "test": ["Please, wait for me!"]}
    for split, lines in texts.items():
        (corpus / split).mkdir(parents=True)
        with open(corpus / split / "metadata.csv", "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=["file_name", "text", "words"])
            writer.writeheader()
            for k, text in enumerate(lines):
                soundfile.write(corpus / split / f"{split}_{k}.wav", np.zeros(1600, np.float32), 16000)
                writer.writerow({"file_name": f"{split}_{k}.wav", "text": text, "words": "[]"})
    description = tmp_path / "homophones.json"
    description.write_text(json.dumps({
        "train": [{"text": "The knight rode away.", "positions": [1, 2]}],
        "test": [{"text": "Please, wait for me!", "positions": [1]}],
    }))
    counts = mark_corpus(str(corpus), str(description))
    assert counts == {"train": {"rows": 2, "homophone_words": 2}, "test": {"rows": 1, "homophone_words": 1}}
    pad_corpus(str(corpus), str(tmp_path / "padded"), progress=False)
    for folder in (corpus, tmp_path / "padded"):
        marked = {row["text"]: json.loads(row["homophones"]) for row in read_corpus(str(folder))}
        assert marked == {"The knight rode away.": [1, 2], "no such word here": [], "Please, wait for me!": [1]}
    description.write_text(json.dumps({"train": [{"text": "no such word here", "positions": [4]}], "test": []}))
    with pytest.raises(ValueError, match="do not fit"):
        mark_corpus(str(corpus), str(description))
