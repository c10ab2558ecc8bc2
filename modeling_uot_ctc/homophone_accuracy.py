"""Homophone accuracy: how often a recogniser spells a homophone the way the reference does.

Definition. Each reference is a normalised transcript (lower case words separated by single spaces); its words are
``reference.split()`` and a word position is a 0-based index into that list. The caller marks, per utterance, the
positions of the reference words that are homophones (the corpus metadata marks them; positions rather than spellings
because the same spelling can be the homophone in one sentence and an ordinary word in another).

Each reference is aligned to its hypothesis with jiwer's word-level Levenshtein alignment
(``jiwer.process_words``). A marked reference word is

- **right** when it lies in an ``equal`` chunk: the hypothesis has exactly that word aligned to it;
- **wrong** when it lies in a ``substitute`` chunk (``right`` heard as ``write``) or a ``delete`` chunk (nothing
  aligned to it).

Insertions add hypothesis words between reference words and cover no reference word, so they never change whether a
reference word is right or wrong. The homophone accuracy is the number of right homophone words divided by the number
of homophone words, pooled over every utterance of the call (a corpus-level share, not a mean of per-utterance
shares, so an utterance weighs as much as the homophones it holds).

Control. The same share for reference words that are not homophones, so that a change in homophone accuracy can be
told apart from a change in word accuracy overall. By default the control words are the non-homophone reference words
whose length in characters is one of the lengths of the homophone words of the same call (pooled over all its
utterances): homophones are mostly short words (to, two, see, sea, right), and short words are recognised differently
from long ones, so matching lengths keeps word length out of the comparison. Because the set of lengths is pooled
over the call, scoring a corpus in one call and scoring it utterance by utterance can pick different control words.
The caller can pass the control positions explicitly instead.

Confusions within a set. Given the homophone sets, a wrong homophone word is also classed by what replaced it: another
member of its own set (``write`` for ``right``: the sound recognised, the spelling missed, the one error that only
context can fix) or anything else (a misspelling, another word, nothing). The share of such confusions is the most
that perfect knowledge of context could add to the homophone accuracy of the same hypotheses.

When a call holds no homophone words the accuracy is NaN and the count 0 (a share of nothing is undefined, and NaN
keeps it from being averaged in silently); the same holds for the control.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import jiwer

__all__ = ["homophone_accuracy"]


def _validated_positions(positions_per_utterance: Sequence[Iterable[int]], word_counts: list[int], argument_name: str,
                         ) -> list[set[int]]:
    """Turn per-utterance position collections into sets, raising ValueError on anything that is not a word index."""
    if len(positions_per_utterance) != len(word_counts):
        raise ValueError(f"{argument_name} has {len(positions_per_utterance)} entries but there are "
                         f"{len(word_counts)} references; give one collection of word positions per utterance")
    validated = []
    for utterance_index, (positions, word_count) in enumerate(zip(positions_per_utterance, word_counts)):
        position_set = set()
        for position in positions:
            # bool is an int subclass; True as a position is almost surely a caller's mistake
            if isinstance(position, bool) or not isinstance(position, int):
                raise ValueError(f"{argument_name}[{utterance_index}] holds {position!r}, which is not an integer "
                                 "word position")
            if not 0 <= position < word_count:
                raise ValueError(f"{argument_name}[{utterance_index}] holds position {position}, out of range for a "
                                 f"reference of {word_count} words (valid positions are 0 to {word_count - 1})")
            position_set.add(position)
        validated.append(position_set)
    return validated


def _right_reference_positions(alignment: list[jiwer.AlignmentChunk]) -> set[int]:
    """Reference word positions that jiwer aligned to an identical hypothesis word."""
    right = set()
    for chunk in alignment:
        if chunk.type == "equal":
            right.update(range(chunk.ref_start_idx, chunk.ref_end_idx))
    return right


def _substitutions(alignment: list[jiwer.AlignmentChunk], hypothesis_words: list[str]) -> dict[int, str]:
    """Reference word position -> the hypothesis word substituted for it (jiwer's substitutions are one to one)."""
    replaced = {}
    for chunk in alignment:
        if chunk.type == "substitute":
            for offset, position in enumerate(range(chunk.ref_start_idx, chunk.ref_end_idx)):
                replaced[position] = hypothesis_words[chunk.hyp_start_idx + offset]
    return replaced


def _share(right: int, total: int) -> float:
    return right / total if total else math.nan


def homophone_accuracy(references: Sequence[str], predictions: Sequence[str], homophones: Sequence[Iterable[int]],
                       control: Sequence[Iterable[int]] | None = None,
                       sets: Sequence[Sequence[str]] | None = None) -> dict[str, float | int]:
    """Share of the references' homophone words that the predictions spell right, beside a control share.

    See the module docstring for the definition (alignment, what counts as right, the control words).

    Args:
        references: the reference transcripts, normalised (lower case words separated by single spaces). An empty
            reference holds no words and is skipped (jiwer cannot align it); its positions must then be empty.
        predictions: the hypothesis transcripts, normalised the same way, one per reference; may be empty strings.
        homophones: per utterance, a collection (set, list, ...) of 0-based positions into ``reference.split()`` of
            the words that are homophones. Repeated positions count once.
        control: per utterance, the positions of the control words, or None for the default control: the
            non-homophone reference words whose character length is one of the homophone words' lengths in this call.
            Explicit control positions must not overlap the homophone positions of the same utterance.
        sets: the homophone sets (each a sequence of words spoken alike), to count the confusions within a set; a
            marked word in no set is never counted as confused.

    Returns:
        A dict with ``homophone_accuracy`` (right / total, NaN when there are no homophone words),
        ``homophone_right`` and ``homophone_words`` (the counts), and ``control_accuracy``, ``control_right``,
        ``control_words`` likewise for the control words. Counts are pooled over all utterances. With ``sets``, also
        ``set_confusions`` (marked words replaced by another member of their set) and ``set_confusion_share``
        (that count over ``homophone_words``).

    Raises:
        ValueError: when the lists differ in length, a position is not an integer or is out of range for its
            reference, a reference is not normalised (its words differ from what jiwer splits), or explicit control
            positions overlap homophone positions.
    """
    if len(predictions) != len(references):
        raise ValueError(f"got {len(references)} references but {len(predictions)} predictions; "
                         "give one prediction per reference")
    reference_words = [reference.split() for reference in references]
    word_counts = [len(words) for words in reference_words]
    homophone_positions = _validated_positions(homophones, word_counts, "homophones")
    explicit_control_positions = None
    if control is not None:
        explicit_control_positions = _validated_positions(control, word_counts, "control")
        for utterance_index, (control_set, homophone_set) in enumerate(
                zip(explicit_control_positions, homophone_positions)):
            overlap = control_set & homophone_set
            if overlap:
                raise ValueError(f"control[{utterance_index}] and homophones[{utterance_index}] share positions "
                                 f"{sorted(overlap)}; a control word must not be a homophone")

    # jiwer refuses empty references; they hold no words to score, so leave them out of the alignment
    scored_utterances = [index for index, count in enumerate(word_counts) if count > 0]
    right_positions_per_utterance: dict[int, set[int]] = {}
    substituted_per_utterance: dict[int, dict[int, str]] = {}
    if scored_utterances:
        word_output = jiwer.process_words([references[index] for index in scored_utterances],
                                          [predictions[index] for index in scored_utterances])
        for aligned_index, utterance_index in enumerate(scored_utterances):
            # positions index reference.split(); they only mean the same words as jiwer's if both split alike
            if word_output.references[aligned_index] != reference_words[utterance_index]:
                raise ValueError(f"reference {utterance_index} ({references[utterance_index]!r}) is not normalised: "
                                 "jiwer splits it into different words than str.split(); collapse whitespace first")
            right_positions_per_utterance[utterance_index] = _right_reference_positions(
                word_output.alignments[aligned_index])
            substituted_per_utterance[utterance_index] = _substitutions(
                word_output.alignments[aligned_index], word_output.hypotheses[aligned_index])

    if explicit_control_positions is None:
        homophone_lengths = {len(reference_words[index][position])
                             for index, positions in enumerate(homophone_positions) for position in positions}
        control_positions = [{position for position, word in enumerate(words)
                              if position not in homophone_set and len(word) in homophone_lengths}
                             for words, homophone_set in zip(reference_words, homophone_positions)]
    else:
        control_positions = explicit_control_positions

    set_of_word = {word: index for index, members in enumerate(sets or ()) for word in members}
    homophone_right = homophone_total = control_right = control_total = confused = 0
    for utterance_index in scored_utterances:
        right_positions = right_positions_per_utterance[utterance_index]
        homophone_total += len(homophone_positions[utterance_index])
        homophone_right += len(homophone_positions[utterance_index] & right_positions)
        control_total += len(control_positions[utterance_index])
        control_right += len(control_positions[utterance_index] & right_positions)
        words, replaced = reference_words[utterance_index], substituted_per_utterance[utterance_index]
        confused += sum(1 for position in homophone_positions[utterance_index] if position in replaced
                        and words[position] in set_of_word
                        and set_of_word.get(replaced[position]) == set_of_word[words[position]])

    result = {
        "homophone_accuracy": _share(homophone_right, homophone_total),
        "homophone_right": homophone_right,
        "homophone_words": homophone_total,
        "control_accuracy": _share(control_right, control_total),
        "control_right": control_right,
        "control_words": control_total,
    }
    if sets is not None:
        result.update(set_confusions=confused, set_confusion_share=_share(confused, homophone_total))
    return result
