"""The corpus builder on a handful of utterances: audio, transcripts, timings, determinism, disjoint splits."""

import csv
import hashlib
import json
import os

import soundfile

from modeling_uot_ctc.corpus import UNSEEN_VARIANTS, build_corpus, clean_sentences, plan_corpus, wordnet_sentences

SENTENCES = [
    "I can breathe better when the air is clean",
    "the cat sat down on the mat",
    "she reads a book every night",
    "open the door quietly please",
    "birds sing loudly in the morning",
    "keep the light on tonight",
    "he answered the phone at once",
    "they walked home together",
    "the river flows to the sea",
    "we planted a tree in spring",
]


def read_split(root, split):
    with open(os.path.join(root, split, "metadata.csv"), newline="") as handle:
        return list(csv.DictReader(handle))


def digest(root):
    sha = hashlib.sha256()
    for dirpath, _, files in sorted(os.walk(root)):
        for name in sorted(files):
            sha.update(name.encode())
            sha.update(open(os.path.join(dirpath, name), "rb").read())
    return sha.hexdigest()


def test_audio_transcripts_and_word_timings(tmp_path):
    counts = build_corpus(str(tmp_path), SENTENCES, utterances=10, seed=3, workers=2, test_fraction=0.2, progress=False)
    assert counts == {"train": 8, "test": 2}
    for split in ("train", "test"):
        for row in read_split(tmp_path, split):
            audio, rate = soundfile.read(os.path.join(tmp_path, split, row["file_name"]))
            assert rate == 16_000 and audio.ndim == 1
            duration = len(audio) / rate
            n_words = len(row["text"].split())
            assert 0.15 * n_words < duration < 1.5 * n_words + 1.0  # speech-like pace
            assert row["text"] in SENTENCES
            words = json.loads(row["words"])
            assert [w for w, _, _ in words] == row["text"].split()
            times = [t for _, start, end in words for t in (start, end)]
            assert times == sorted(times) and times[0] >= 0 and times[-1] <= duration + 1e-3
            assert all(end > start for _, start, end in words)


def test_same_seed_same_files(tmp_path):
    build_corpus(str(tmp_path / "a"), SENTENCES, utterances=6, seed=1, workers=2, progress=False)
    build_corpus(str(tmp_path / "b"), SENTENCES, utterances=6, seed=1, workers=1, progress=False)
    assert digest(tmp_path / "a") == digest(tmp_path / "b")


def test_splits_share_no_sentence_and_test_has_unseen_voices():
    sentences = [f"sentence number {word} is here" for word in "abcdefghijklmnopqrstuvwxyz"] * 1
    plan = plan_corpus(clean_sentences(sentences), utterances=26, seed=0, test_fraction=0.3)
    train = {u.text for u in plan if u.split == "train"}
    test = {u.text for u in plan if u.split == "test"}
    assert train and test and not train & test
    train_voices = {u.voice for u in plan if u.split == "train"}
    unseen = [u for u in plan if u.split == "test" and not u.seen_voice]
    assert unseen and all(u.voice not in train_voices and u.voice.split("+")[1] in UNSEEN_VARIANTS for u in unseen)
    assert any(u.seen_voice for u in plan if u.split == "test")


def test_wordnet_examples_are_read_from_glosses(tmp_path):
    (tmp_path / "data.noun").write_text(
        "  1 This software and database is being provided to you, the LICENSEE, by Princeton University\n"
        '00001740 03 n 01 entity 0 003 ~ 00001930 n 0000 | that which is perceived; "the air is clean here today"\n'
        '00002137 03 n 02 abstraction 0 | a concept; "the 2 of us"; "she left early in the morning"; "ok"\n'
    )
    assert wordnet_sentences(str(tmp_path)) == ["the air is clean here today", "she left early in the morning"]
