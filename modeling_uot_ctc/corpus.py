"""Build an offline English speech corpus: real sentences spoken by espeak-ng, with word timings.

    python -m modeling_uot_ctc.corpus --output data/demo_corpus --utterances 3000 --seed 0
    python -m modeling_uot_ctc.corpus --pad-from data/demo_corpus --output data/demo_corpus_padded --seed 0

Sentences: the example sentences quoted in WordNet 3.0's glosses ("I can breathe better when the air is clean"),
read from Debian's `wordnet-base` files (WordNet 3.0 licence: free use, copy and distribution with its notice), or
any text file with one sentence per line (`--sentences`). Speech: espeak-ng through its library as shipped in the
PyPI wheel `espeakng-loader` (no system package), with several accents, voice variants, speeds and pitches; the
library's word events give each word's start time. Output: an `audiofolder` layout, `<output>/<split>/` with 16 kHz
mono WAV files and a `metadata.csv` (`file_name`, `text`, `voice`, `speed`, `pitch`, `seen_voice`, `words`: JSON
`[[word, start_s, end_s], ...]`). Splits never share a sentence; part of the test split is spoken by voice variants
that training never hears. The same seed gives the same files. `--pad-from` copies a corpus with silence or noise
around each utterance (`pad_corpus`), the harder regime of the experiments.
"""

from __future__ import annotations

import argparse
import csv
import ctypes
import json
import multiprocessing
import os
import random
import re
import zlib
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from typing import Iterable, Optional

import numpy as np

from .data import SAMPLING_RATE

WORDNET_FILES = ("data.noun", "data.verb", "data.adj", "data.adv")
WORDNET_DIRS = ("/usr/share/wordnet", "/usr/share/wordnet/dict")
ACCENTS = ("en-us", "en", "en-gb-scotland", "en-gb-x-rp", "en-029", "en-gb-x-gbclan", "en-gb-x-gbcwmd")
VARIANTS = ("m1", "m2", "m3", "m4", "m5", "m6", "m7", "f1", "f2", "f3", "f4", "klatt", "klatt2")
UNSEEN_VARIANTS = ("f4", "klatt2")  # spoken only in part of the test split
# Voice sets, as `(voices of training and half the test split, voices of the other half)`. "demo" is the corpus of the
# demo and the from-scratch experiments. "base" (the stage-1 corpus of the transfer experiments) and "target" (their
# stage-2 fine-tuning set) share no accent and no voice variant: the target stands for speakers a pretrained encoder
# never heard.
BASE_ACCENTS = ("en-us", "en", "en-gb-x-rp", "en-gb-x-gbclan", "en-gb-x-gbcwmd")
BASE_VARIANTS = ("m1", "m2", "m3", "m4", "m5", "m6", "m7", "m8", "f1", "f2", "f3", "f5", "klatt", "klatt3")
TARGET_ACCENTS = ("en-gb-scotland", "en-029", "en-us-nyc")
TARGET_VARIANTS = ("f4", "klatt2", "klatt4")
VOICE_SETS = {
    "demo": (
        tuple(f"{a}+{v}" for a in ACCENTS for v in VARIANTS if v not in UNSEEN_VARIANTS),
        tuple(f"{a}+{v}" for a in ACCENTS for v in UNSEEN_VARIANTS),
    ),
    "base": (tuple(f"{a}+{v}" for a in BASE_ACCENTS for v in BASE_VARIANTS), ()),
    "target": (tuple(f"{a}+{v}" for a in TARGET_ACCENTS for v in TARGET_VARIANTS), ()),
}
_ALLOWED = re.compile(r"^[A-Za-z][A-Za-z ,;:'?!.-]*$")


@dataclass
class Utterance:
    """One item to synthesise."""

    split: str
    index: int
    text: str
    voice: str
    speed: int
    pitch: int
    seen_voice: bool

    @property
    def file_name(self) -> str:
        return f"{self.split}_{self.index:05d}.wav"


def wordnet_sentences(folder: Optional[str] = None) -> list[str]:
    """The quoted example sentences of WordNet's glosses, cleaned, deduplicated, in a fixed order."""
    folders = [folder] if folder else list(WORDNET_DIRS)
    paths = [os.path.join(f, name) for f in folders for name in WORDNET_FILES if os.path.isfile(os.path.join(f, name))]
    if not paths:
        raise FileNotFoundError(
            "No WordNet data files found (data.noun, ...): install Debian's wordnet-base "
            "(`apt-get install wordnet-base`) or pass --sentences with a text file of sentences."
        )
    sentences = []
    for path in paths:
        with open(path, encoding="latin-1") as handle:
            for line in handle:
                if line.startswith("  ") or "|" not in line:
                    continue  # the licence header, or a line without a gloss
                gloss = line.split("|", 1)[1]
                sentences.extend(re.findall(r'"([^"]+)"', gloss))
    return clean_sentences(sentences)


def clean_sentences(sentences: Iterable[str], min_words: int = 3, max_words: int = 14) -> list[str]:
    """Keep sentences of plain letters and light punctuation, of a speakable length; drop duplicates."""
    kept, seen = [], set()
    for sentence in sentences:
        sentence = " ".join(sentence.split()).strip()
        key = sentence.lower()
        if key in seen or not _ALLOWED.match(sentence) or not min_words <= len(sentence.split()) <= max_words:
            continue
        seen.add(key)
        kept.append(sentence)
    return kept


def plan_corpus(
    sentences: list[str],
    utterances: int,
    seed: int,
    test_fraction: float = 0.1,
    voices: str = "demo",
    skip_sentences: int = 0,
) -> list[Utterance]:
    """Assign sentences to splits (disjoint) and a voice, speed and pitch to each utterance, from `seed` alone.

    The sentences are shuffled by `seed`; the corpus takes `utterances` of them after the first `skip_sentences`, so
    that two corpora of the same seed, one skipping what the other took, share no sentence. `voices` names an entry
    of `VOICE_SETS`; when it has voices for unseen speakers, every other test utterance is spoken by one of them.
    """
    if voices not in VOICE_SETS:
        raise ValueError(f"`voices` must be one of {sorted(VOICE_SETS)}, got {voices!r}.")
    rng = random.Random(seed)
    pool = list(sentences)
    rng.shuffle(pool)
    if skip_sentences + utterances > len(pool):
        raise ValueError(
            f"{utterances} utterances after {skip_sentences} skipped sentences asked for, but only {len(pool)} "
            "distinct sentences are available."
        )
    pool = pool[skip_sentences : skip_sentences + utterances]
    n_test = max(1, int(round(test_fraction * utterances)))
    seen, unseen = VOICE_SETS[voices]
    plan = []
    for split, chunk in (("test", pool[:n_test]), ("train", pool[n_test:])):
        for index, text in enumerate(chunk):
            seen_voice = split == "train" or index % 2 == 0 or not unseen
            plan.append(Utterance(
                split=split, index=index, text=text, voice=rng.choice(seen if seen_voice else unseen),
                speed=rng.randint(130, 190), pitch=rng.randint(30, 70), seen_voice=seen_voice,
            ))
    return plan


class _EventId(ctypes.Union):
    _fields_ = [("number", ctypes.c_int), ("name", ctypes.c_char_p), ("string", ctypes.c_char * 8)]


class _Event(ctypes.Structure):
    # espeak_EVENT of speak_lib.h
    _fields_ = [("type", ctypes.c_int), ("unique_identifier", ctypes.c_uint), ("text_position", ctypes.c_int),
                ("length", ctypes.c_int), ("audio_position", ctypes.c_int), ("sample", ctypes.c_int),
                ("user_data", ctypes.c_void_p), ("id", _EventId)]


_CALLBACK = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.POINTER(_Event))
_WORD_EVENT, _LIST_END, _SYNCHRONOUS, _CHARS_UTF8, _END_PAUSE, _RATE, _PITCH = 1, 0, 2, 1, 0x1000, 1, 3


class Speaker:
    """espeak-ng's library in this process, speaking one utterance at a time.

    Written against the library's C interface with ctypes because no maintained Python binding gives word events;
    the library and its data come from the `espeakng-loader` wheel. One instance per process (the library keeps
    global state).
    """

    def __init__(self):
        import espeakng_loader

        self._lib = ctypes.CDLL(espeakng_loader.get_library_path())
        self.rate = self._lib.espeak_Initialize(_SYNCHRONOUS, 0, espeakng_loader.get_data_path().encode(), 0)
        if self.rate <= 0:
            raise RuntimeError("espeak-ng failed to initialise.")
        self._chunks, self._words = [], []
        self._callback = _CALLBACK(self._collect)  # kept alive for as long as the library may call it
        self._lib.espeak_SetSynthCallback(self._callback)

    def _collect(self, wav, n_samples, events):
        if wav and n_samples > 0:
            self._chunks.append(np.ctypeslib.as_array(wav, shape=(n_samples,)).copy())
        k = 0
        while events[k].type != _LIST_END:
            if events[k].type == _WORD_EVENT:
                self._words.append((events[k].text_position, events[k].length, events[k].audio_position))
            k += 1
        return 0

    def seed(self, value: int) -> None:
        """Seed the noise espeak-ng adds (breath, aspiration): its own generator and the C library's `rand()`."""
        self._lib.espeak_ng_SetRandSeed(ctypes.c_long(value))
        ctypes.CDLL(None).srand(ctypes.c_uint(value))

    def speak(self, text: str, voice: str, speed: int, pitch: int):
        """16 kHz float32 samples and `[[word, start_s, end_s], ...]` of `text`."""
        import soxr

        if self._lib.espeak_SetVoiceByName(voice.encode()) != 0:
            raise ValueError(f"espeak-ng has no voice {voice!r}.")
        self._lib.espeak_SetParameter(_RATE, speed, 0)
        self._lib.espeak_SetParameter(_PITCH, pitch, 0)
        self._chunks, self._words = [], []
        data = text.encode("utf-8")
        self._lib.espeak_Synth(data, len(data) + 1, 0, 1, 0, _CHARS_UTF8 | _END_PAUSE, None, None)
        self._lib.espeak_Synchronize()
        audio = np.concatenate(self._chunks).astype(np.float32) / 32768.0 if self._chunks else np.zeros(0, np.float32)
        audio = soxr.resample(audio, self.rate, SAMPLING_RATE).astype(np.float32)
        return audio, word_timings(text, self._words, len(audio) / SAMPLING_RATE)


def word_timings(text: str, events, duration: float) -> list:
    """`[[word, start_s, end_s], ...]` for the whitespace-separated words of `text`, from espeak's word events.

    Events give `(text_position, length, audio_position_ms)` with positions counted from 1 (ASCII text: bytes and
    characters agree). espeak-ng sometimes merges words into one event ("at once"); a word without its own event
    gets a start interpolated by character position between its neighbours. Each word ends where the next starts;
    the last ends with the audio.
    """
    spans = [(m.start(), m.group()) for m in re.finditer(r"\S+", text)]
    known = sorted({position - 1: ms / 1000.0 for position, _, ms in events}.items())
    anchors_at = [0] + [p for p, _ in known] + [len(text)]
    anchors_t = [known[0][1] if known else 0.0] + [t for _, t in known] + [duration]
    anchors_t = np.maximum.accumulate(np.asarray(anchors_t, dtype=float))
    starts = [float(np.interp(position, anchors_at, anchors_t)) for position, _ in spans]
    ends = starts[1:] + [duration]
    return [[word, start, max(end, start)] for (_, word), start, end in zip(spans, starts, ends)]


_SPEAKER: Optional[Speaker] = None


# espeak-ng carries synthesis state from one utterance to the next that neither its API nor re-initialising it
# resets, so an utterance's audio depends on everything the same process spoke before it. The builder therefore cuts
# the plan into fixed shards and speaks each in a fresh process: every file then depends on the plan alone, whatever
# the number of workers.
SHARD_SIZE = 16


def _synthesise_shard(jobs):
    return [_synthesise(job) for job in jobs]


def _synthesise(job):
    global _SPEAKER
    import soundfile

    utterance, folder = job
    if _SPEAKER is None:
        _SPEAKER = Speaker()
    _SPEAKER.seed(zlib.crc32(f"{utterance.split}/{utterance.index}".encode()))
    audio, words = _SPEAKER.speak(utterance.text, utterance.voice, utterance.speed, utterance.pitch)
    soundfile.write(os.path.join(folder, utterance.split, utterance.file_name), audio, SAMPLING_RATE, subtype="PCM_16")
    return utterance, words


def build_corpus(
    output: str,
    sentences: list[str],
    utterances: int = 3000,
    seed: int = 0,
    workers: int = 2,
    test_fraction: float = 0.1,
    progress: bool = True,
    voices: str = "demo",
    skip_sentences: int = 0,
) -> dict:
    """Synthesise the corpus into `output` (audiofolder layout); returns the number of utterances per split.

    `voices` and `skip_sentences` choose the speakers and the sentences, as in :func:`plan_corpus`.
    """
    from tqdm.auto import tqdm

    plan = plan_corpus(sentences, utterances, seed, test_fraction, voices, skip_sentences)
    for split in ("train", "test"):
        os.makedirs(os.path.join(output, split), exist_ok=True)
    rows = {"train": [], "test": []}
    jobs = [(u, output) for u in plan]
    bar = tqdm(total=len(jobs), desc="synthesising", unit="utt", disable=not progress)
    shards = [jobs[start : start + SHARD_SIZE] for start in range(0, len(jobs), SHARD_SIZE)]
    # A fresh process per shard, forked from a server that has imported the package (and so its heavy dependencies)
    # but never spoken. Not this module itself: under `python -m` every worker runs the parent's main module again
    # (multiprocessing's "safe importing of main"), and runpy warns when that module is already imported.
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["modeling_uot_ctc"])
    with ProcessPoolExecutor(max_workers=workers, mp_context=context, max_tasks_per_child=1) as pool:
        for results in pool.map(_synthesise_shard, shards):
            for utterance, words in results:
                rows[utterance.split].append(_row(utterance, words))
                bar.update()
    bar.close()
    for split, split_rows in rows.items():
        split_rows.sort(key=lambda row: row["file_name"])
        with open(os.path.join(output, split, "metadata.csv"), "w", newline="", encoding="utf-8") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(split_rows[0]) if split_rows else ["file_name", "text"])
            writer.writeheader()
            writer.writerows(split_rows)
    return {split: len(split_rows) for split, split_rows in rows.items()}


def _row(utterance: Utterance, words) -> dict:
    return {
        "file_name": utterance.file_name,
        "text": utterance.text,
        "voice": utterance.voice,
        "speed": utterance.speed,
        "pitch": utterance.pitch,
        "seen_voice": utterance.seen_voice,
        "words": json.dumps([[w, round(s, 4), round(e, 4)] for w, s, e in words]),
    }


def read_corpus(folder: str, splits: Iterable[str] = ("train", "test")) -> list[dict]:
    """The rows of a corpus's `metadata.csv` files, split after split, each with `path`, its audio file.

    Args:
        folder: a corpus folder as `build_corpus` writes it (one folder per split).
        splits: the splits to read, in this order.
    """
    rows = []
    for split in splits:
        with open(os.path.join(folder, split, "metadata.csv"), newline="", encoding="utf-8") as handle:
            rows += [{**row, "path": os.path.join(folder, split, row["file_name"])} for row in csv.DictReader(handle)]
    return rows


def pad_corpus(
    source: str,
    output: str,
    seed: int = 0,
    pad_seconds: tuple = (0.4, 1.2),
    noise_share: float = 0.5,
    noise_level_db: tuple = (-25.0, -10.0),
    progress: bool = True,
) -> dict:
    """Copy a corpus with silence or noise added before and after each utterance: frames that no word explains.

    This is the harder regime of the experiments (docs/RESULTS.md): a balanced alignment must spread every token's
    mass over the padding too, an unbalanced one may leave it out. Each side of each utterance gets a segment of
    `pad_seconds` (drawn uniformly); with probability `noise_share` it is white noise at `noise_level_db` (drawn
    uniformly) relative to the utterance's RMS, otherwise near-silence (noise 60 dB below it, so that no frame is
    digitally zero). Word timings move with the leading segment; the last word still ends where the speech ends.
    Columns `lead_s` and `trail_s` record the padding. The same seed gives the same files.

    Args:
        source: a corpus written by :func:`build_corpus` (audiofolder layout with word timings).
        output: the folder to write, in the same layout.
        seed: seeds every draw.
        pad_seconds: shortest and longest padding on each side, in seconds.
        noise_share: probability that a padding segment is noise rather than near-silence.
        noise_level_db: range of the noise level, in dB relative to the utterance's RMS.
        progress: show a progress bar.
    """
    import soundfile
    from tqdm.auto import tqdm

    rng = np.random.default_rng(seed)
    counts = {}
    for split in ("train", "test"):
        with open(os.path.join(source, split, "metadata.csv"), newline="", encoding="utf-8") as handle:
            rows = list(csv.DictReader(handle))
        if not rows:
            raise ValueError(f"{source}/{split}/metadata.csv lists no utterance.")
        os.makedirs(os.path.join(output, split), exist_ok=True)
        for row in tqdm(rows, desc=f"padding {split}", unit="utt", disable=not progress):
            audio, rate = soundfile.read(os.path.join(source, split, row["file_name"]), dtype="float32")
            rms = float(np.sqrt(np.mean(audio**2))) or 1e-3
            segments = []
            for _ in range(2):
                length = int(rng.uniform(*pad_seconds) * rate)
                level_db = rng.uniform(*noise_level_db) if rng.random() < noise_share else -60.0
                segments.append((rms * 10 ** (level_db / 20) * rng.standard_normal(length)).astype(np.float32))
            lead, trail = segments
            padded = np.clip(np.concatenate([lead, audio, trail]), -1.0, 1.0)
            soundfile.write(os.path.join(output, split, row["file_name"]), padded, rate, subtype="PCM_16")
            shift = len(lead) / rate
            words = [[w, round(s + shift, 4), round(e + shift, 4)] for w, s, e in json.loads(row["words"])]
            row.update(words=json.dumps(words), lead_s=round(shift, 6), trail_s=round(len(trail) / rate, 6))
        with open(os.path.join(output, split, "metadata.csv"), "w", newline="", encoding="utf-8") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
        counts[split] = len(rows)
    return counts


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", required=True, help="folder to write (audiofolder layout)")
    parser.add_argument("--utterances", type=int, default=3000, help="utterances in all, one sentence each")
    parser.add_argument("--seed", type=int, default=0, help="same seed, same corpus")
    parser.add_argument("--workers", type=int, default=2, help="synthesis processes")
    parser.add_argument("--test-fraction", type=float, default=0.1, help="share of sentences for the test split")
    parser.add_argument(
        "--voices", default="demo", choices=sorted(VOICE_SETS),
        help="speaker set: demo (the demo's), base (stage 1 of the transfer experiments), target (stage 2: accents "
        "and voice variants that base never has)",
    )
    parser.add_argument(
        "--skip-sentences", type=int, default=0,
        help="leave out the first N sentences of the seed's shuffle (another corpus of the same seed took them)",
    )
    parser.add_argument("--sentences", help="a text file, one sentence per line (default: WordNet's examples)")
    parser.add_argument("--wordnet-dir", help="folder of WordNet's data.* files (default: Debian's location)")
    parser.add_argument(
        "--homophones",
        help="the homophones.json of `python -m modeling_uot_ctc.homophones`: mark each row's homophone words (a "
        "`homophones` column of word positions)",
    )
    parser.add_argument(
        "--pad-from",
        help="instead of synthesising, copy this corpus with silence or noise padding around each utterance",
    )
    args = parser.parse_args(argv)
    if args.pad_from:
        counts = pad_corpus(args.pad_from, args.output, seed=args.seed)
        print(f"wrote {counts['train']} training and {counts['test']} test padded utterances to {args.output}")
        return
    if args.sentences:
        with open(args.sentences, encoding="utf-8") as handle:
            sentences = clean_sentences(handle)
    else:
        sentences = wordnet_sentences(args.wordnet_dir)
    counts = build_corpus(
        args.output, sentences, args.utterances, args.seed, args.workers, args.test_fraction,
        voices=args.voices, skip_sentences=args.skip_sentences,
    )
    print(f"wrote {counts['train']} training and {counts['test']} test utterances to {args.output}")
    if args.homophones:
        from .homophones import mark_corpus

        marked = mark_corpus(args.output, args.homophones)
        print("marked " + ", ".join(f"{m['homophone_words']} homophone words in {split}"
                                    for split, m in marked.items()))


if __name__ == "__main__":
    # Through the package module, so that worker processes find the functions they are sent under its name.
    from modeling_uot_ctc.corpus import main as package_main

    package_main()
