"""The corpus builder on a handful of utterances: audio, transcripts, timings, determinism, disjoint splits."""

import csv
import hashlib
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import soundfile

from modeling_uot_ctc.corpus import (
    UNSEEN_VARIANTS,
    build_corpus,
    clean_sentences,
    pad_corpus,
    plan_corpus,
    wordnet_sentences,
)

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
    # espeak-ng keeps state between utterances; what was spoken before (another corpus here) must not leak in.
    build_corpus(str(tmp_path / "a"), SENTENCES, utterances=6, seed=1, workers=2, progress=False)
    build_corpus(str(tmp_path / "other"), SENTENCES, utterances=6, seed=2, workers=1, progress=False)
    build_corpus(str(tmp_path / "b"), SENTENCES, utterances=6, seed=1, workers=1, progress=False)
    assert digest(tmp_path / "a") == digest(tmp_path / "b")
    assert digest(tmp_path / "a") != digest(tmp_path / "other")


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


def test_padding_keeps_speech_and_shifts_timings(tmp_path):
    build_corpus(str(tmp_path / "clean"), SENTENCES, utterances=6, seed=2, workers=1, progress=False)
    counts = pad_corpus(str(tmp_path / "clean"), str(tmp_path / "padded"), seed=5, noise_share=1.0, progress=False)
    assert counts == {"train": 5, "test": 1}
    for split in ("train", "test"):
        pairs = zip(read_split(tmp_path / "clean", split), read_split(tmp_path / "padded", split))
        for clean_row, padded_row in pairs:
            clean, rate = soundfile.read(os.path.join(tmp_path, "clean", split, clean_row["file_name"]))
            padded, _ = soundfile.read(os.path.join(tmp_path, "padded", split, padded_row["file_name"]))
            lead, trail = float(padded_row["lead_s"]), float(padded_row["trail_s"])
            assert 0.4 <= lead <= 1.2 and 0.4 <= trail <= 1.2
            start = round(lead * rate)
            assert len(padded) == len(clean) + start + round(trail * rate)
            # The speech itself is copied untouched (to 16-bit rounding), the padding is not silent.
            np.testing.assert_allclose(padded[start:start + len(clean)], clean, atol=1 / 32768)
            assert np.abs(padded[:start]).max() > 0 and np.abs(padded[start + len(clean):]).max() > 0
            clean_words, padded_words = json.loads(clean_row["words"]), json.loads(padded_row["words"])
            for (word, s0, e0), (same_word, s1, e1) in zip(clean_words, padded_words):
                assert word == same_word
                assert abs(s1 - (s0 + lead)) < 1e-3 and abs(e1 - (e0 + lead)) < 1e-3
    again = pad_corpus(str(tmp_path / "clean"), str(tmp_path / "again"), seed=5, noise_share=1.0, progress=False)
    assert again == counts and digest(tmp_path / "padded") == digest(tmp_path / "again")


def test_base_and_target_corpora_share_no_sentence_accent_or_voice_variant():
    """The transfer experiments' target stands for speakers the base model never heard, saying new sentences."""
    sentences = clean_sentences(f"sentence {a} number {b} here" for a in "abcdefghij" for b in "abcdefghij")
    base = plan_corpus(sentences, utterances=60, seed=4, test_fraction=0.1, voices="base")
    target = plan_corpus(sentences, utterances=30, seed=4, test_fraction=1 / 3, voices="target", skip_sentences=60)
    assert not {u.text for u in base} & {u.text for u in target}
    accents = lambda plan: {u.voice.split("+")[0] for u in plan}  # noqa: E731
    variants = lambda plan: {u.voice.split("+")[1] for u in plan}  # noqa: E731
    assert not accents(base) & accents(target) and not variants(base) & variants(target)
    assert all(u.seen_voice for u in base + target)  # no held-out voices inside either corpus
    assert sum(u.split == "test" for u in target) == 10
    # The demo's corpus is unchanged by the new arguments' defaults.
    assert plan_corpus(sentences, 40, 1) == plan_corpus(sentences, 40, 1, voices="demo", skip_sentences=0)
    with pytest.raises(ValueError, match="only 100"):
        plan_corpus(sentences, utterances=50, seed=4, skip_sentences=60)


def test_the_documented_command_builds_a_corpus_without_warnings(tmp_path):
    """`python -m modeling_uot_ctc.corpus`, as the README, the Makefile and the demo run it: two worker processes,
    and not one warning from them or from the parent (runpy's `found in sys.modules` among them)."""
    sentences = tmp_path / "sentences.txt"
    sentences.write_text("\n".join(SENTENCES[:6]) + "\n")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    done = subprocess.run(
        [sys.executable, "-W", "default", "-m", "modeling_uot_ctc.corpus", "--sentences", str(sentences),
         "--output", str(tmp_path / "corpus"), "--utterances", "6", "--test-fraction", "0.34", "--workers", "2"],
        cwd=root, capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "wrote 4 training and 2 test utterances" in done.stdout
    assert "Warning" not in done.stderr + done.stdout, done.stderr[-3000:]
    assert len(read_split(tmp_path / "corpus", "train")) == 4
