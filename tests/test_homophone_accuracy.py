"""Homophone accuracy against alignments worked out by hand (the expected numbers come from reading the sentences,
not from running the code under test); jiwer's own hit counts serve as the one outside reference."""

from __future__ import annotations

import math

import jiwer
import pytest

from modeling_uot_ctc.homophone_accuracy import homophone_accuracy


def test_substituted_homophone_counts_wrong():
    # "right" -> "write" is a one-word substitution; every other word matches.
    # Control lengths = {5} (right); among the other words only "light" has 5 letters, and it is heard right.
    result = homophone_accuracy(["turn right at the light"], ["turn write at the light"], [{1}])
    assert result["homophone_accuracy"] == 0.0
    assert (result["homophone_right"], result["homophone_words"]) == (0, 1)
    assert result["control_accuracy"] == 1.0
    assert (result["control_right"], result["control_words"]) == (1, 1)


def test_deleted_homophone_counts_wrong():
    # The cheapest alignment deletes "sea" (cost 1); anything else costs at least 2.
    # Control lengths = {3}: "saw" and "the", both matched.
    result = homophone_accuracy(["we saw the sea today"], ["we saw the today"], [[3]])
    assert (result["homophone_right"], result["homophone_words"]) == (0, 1)
    assert result["homophone_accuracy"] == 0.0
    assert (result["control_right"], result["control_words"]) == (2, 2)


def test_insertion_next_to_correct_homophone_leaves_it_right():
    # "the" is inserted right after the homophone "to"; the reference words all stay matched.
    # Control lengths = {2}: only "we".
    result = homophone_accuracy(["we went to school"], ["we went to the school"], [{2}])
    assert (result["homophone_right"], result["homophone_words"]) == (1, 1)
    assert result["homophone_accuracy"] == 1.0
    assert (result["control_right"], result["control_words"]) == (1, 1)


def test_inserted_wrong_spelling_beside_the_right_one_does_not_take_the_credit():
    # The hypothesis says "too to": "too" is an insertion, "to" is matched to the reference "to".
    result = homophone_accuracy(["go to school"], ["go too to school"], [{1}])
    assert (result["homophone_right"], result["homophone_words"]) == (1, 1)


def test_correct_homophone_amid_other_errors_counts_right():
    # Same length, so the alignment is word by word: the->a, rode->road, through->threw, night->nite are
    # substitutions; "knight" and the second "the" match.
    result = homophone_accuracy(["the knight rode through the night"], ["a knight road threw the nite"], [{1}])
    assert (result["homophone_right"], result["homophone_words"]) == (1, 1)
    assert result["homophone_accuracy"] == 1.0


def test_several_homophones_in_one_utterance_with_mixed_outcomes():
    # Word-by-word alignment as above: knight matched, rode->road and night->nite substituted: 1 of 3.
    # Lengths {6, 4, 5}: the other words are "the" (3), "through" (7), "the" (3), so no control words.
    result = homophone_accuracy(["the knight rode through the night"], ["a knight road threw the nite"],
                                [{1, 2, 5}])
    assert (result["homophone_right"], result["homophone_words"]) == (1, 3)
    assert result["homophone_accuracy"] == pytest.approx(1 / 3)
    assert result["control_words"] == 0
    assert math.isnan(result["control_accuracy"])


def test_default_control_share_on_hand_made_example():
    # Word by word: the->a (wrong), cat, ate (right), two->too (wrong, the homophone), big->bag (wrong), red, fish
    # (right). Homophone "two" has 3 letters, so the control is every other 3-letter word: the, cat, ate, big, red;
    # "fish" has 4 and is left out. Right among them: cat, ate, red = 3 of 5.
    result = homophone_accuracy(["the cat ate two big red fish"], ["a cat ate too bag red fish"], [{3}])
    assert (result["homophone_right"], result["homophone_words"]) == (0, 1)
    assert (result["control_right"], result["control_words"]) == (3, 5)
    assert result["control_accuracy"] == pytest.approx(0.6)


def test_explicit_control_positions_replace_the_length_rule():
    # Same sentence; the control is given as "big" (wrong) and "fish" (right): 1 of 2.
    result = homophone_accuracy(["the cat ate two big red fish"], ["a cat ate too bag red fish"], [{3}],
                                control=[{4, 6}])
    assert (result["control_right"], result["control_words"]) == (1, 2)
    assert result["control_accuracy"] == 0.5


def test_explicit_control_overlapping_homophones_is_refused():
    with pytest.raises(ValueError, match="must not be a homophone"):
        homophone_accuracy(["the cat ate two big red fish"], ["a cat ate too bag red fish"], [{3}], control=[{3, 4}])


def test_corpus_level_aggregation_pools_words_not_utterance_shares():
    # Utterance 1: "right" -> "write" at 0 (wrong), the second "right" at 2 matched: 1 of 2.
    # Utterance 2: "see" matched: 1 of 1.
    # Pooled: 2 of 3; a mean of per-utterance shares would give (0.5 + 1) / 2 = 0.75.
    # Control lengths {5, 3}: "now" (utterance 1) and "you" (utterance 2), both matched; "here" has 4 letters.
    result = homophone_accuracy(["right here right now", "see you"], ["write here right now", "see you"],
                                [{0, 2}, {0}])
    assert (result["homophone_right"], result["homophone_words"]) == (2, 3)
    assert result["homophone_accuracy"] == pytest.approx(2 / 3)
    assert result["homophone_accuracy"] != pytest.approx(0.75)
    assert (result["control_right"], result["control_words"]) == (2, 2)


def test_control_lengths_are_pooled_over_the_call():
    # Utterance 2 has no homophone, yet its 3-letter "cat" is a control word because utterance 1's homophone "sea"
    # has 3 letters; "sat" is also 3 letters and substituted by "sad".
    result = homophone_accuracy(["the sea", "cat sat"], ["the sea", "cat sad"], [{1}, set()])
    assert (result["homophone_right"], result["homophone_words"]) == (1, 1)
    # "the" (right), "cat" (right), "sat" (wrong)
    assert (result["control_right"], result["control_words"]) == (2, 3)


def test_empty_prediction_deletes_every_homophone():
    result = homophone_accuracy(["to be or not"], [""], [{0}])
    assert (result["homophone_right"], result["homophone_words"]) == (0, 1)
    # Control lengths {2}: "be", "or", both deleted.
    assert (result["control_right"], result["control_words"]) == (0, 2)


def test_empty_reference_is_skipped():
    result = homophone_accuracy(["", "to go"], ["uh", "to go"], [set(), {0}])
    assert (result["homophone_right"], result["homophone_words"]) == (1, 1)
    # "go" is the only other 2-letter word.
    assert (result["control_right"], result["control_words"]) == (1, 1)


def test_repeated_positions_count_once():
    result = homophone_accuracy(["turn right"], ["turn write"], [[1, 1]])
    assert result["homophone_words"] == 1


def test_no_homophones_gives_nan_and_zero():
    result = homophone_accuracy(["the cat sat"], ["the cat sat"], [set()])
    assert math.isnan(result["homophone_accuracy"])
    assert result["homophone_words"] == 0
    assert result["homophone_right"] == 0
    # With no homophone lengths, the default control is empty too.
    assert math.isnan(result["control_accuracy"])
    assert result["control_words"] == 0


def test_no_utterances_gives_nan_and_zero():
    result = homophone_accuracy([], [], [])
    assert math.isnan(result["homophone_accuracy"])
    assert result["homophone_words"] == 0


@pytest.mark.parametrize("references, predictions, homophones, message", [
    (["a b", "c d"], ["a b"], [{0}, {0}], "2 references but 1 predictions"),
    (["a b", "c d"], ["a b", "c d"], [{0}], "homophones has 1 entries but there are 2 references"),
    (["turn right here"], ["turn right here"], [{3}], "position 3, out of range for a reference of 3 words"),
    (["turn right here"], ["turn right here"], [{-1}], "position -1, out of range"),
    (["turn right here"], ["turn right here"], [["1"]], "not an integer word position"),
    (["turn right here"], ["turn right here"], [[True]], "not an integer word position"),
    ([""], ["x"], [{0}], "out of range for a reference of 0 words"),
    (["turn\tright here"], ["turn right here"], [{1}], "not normalised"),
])
def test_bad_input_raises_clear_value_error(references, predictions, homophones, message):
    with pytest.raises(ValueError, match=message):
        homophone_accuracy(references, predictions, homophones)


def test_bad_control_positions_raise():
    with pytest.raises(ValueError, match="control has 2 entries but there are 1 references"):
        homophone_accuracy(["turn right"], ["turn right"], [{1}], control=[{0}, {0}])
    with pytest.raises(ValueError, match=r"control\[0\] holds position 5"):
        homophone_accuracy(["turn right"], ["turn right"], [{1}], control=[{5}])


def test_every_word_marked_agrees_with_jiwer_counts():
    # With every reference word marked, right words are jiwer's hits and all words are hits + substitutions +
    # deletions. By hand: utterance 1 has 3 hits and 1 substitution (write); utterance 2 loses "sea" (deletion)
    # and gains "uh" (insertion, which touches no reference word); utterance 3 is fully deleted.
    references = ["i will write it", "we saw the sea", "to be"]
    predictions = ["i will right it", "uh we saw the", ""]
    every_position = [set(range(len(reference.split()))) for reference in references]
    result = homophone_accuracy(references, predictions, every_position)
    jiwer_output = jiwer.process_words(references, predictions)
    assert (jiwer_output.hits, jiwer_output.substitutions, jiwer_output.deletions, jiwer_output.insertions) == \
        (6, 1, 3, 1)
    assert result["homophone_right"] == jiwer_output.hits == 6
    assert result["homophone_words"] == jiwer_output.hits + jiwer_output.substitutions + jiwer_output.deletions == 10
    assert result["homophone_accuracy"] == pytest.approx(0.6)
    # No word is left outside the homophones, so the default control is empty.
    assert result["control_words"] == 0


def test_confusions_within_a_set_are_told_from_other_errors():
    sets = [("right", "write", "rite"), ("sea", "see")]
    references = ["turn right at the sea", "i see the rite", "write to me"]
    # right -> write: the set's other member (context could fix it); sea -> seal: another word; see -> see: right;
    # rite -> deleted; write -> rite: the set's other member again, inside a two-word substitution.
    predictions = ["turn write at the seal", "i see the", "rite two me"]
    scores = homophone_accuracy(references, predictions, [[1, 4], [1, 3], [0]], sets=sets)
    assert (scores["homophone_right"], scores["homophone_words"]) == (1, 5)
    assert scores["set_confusions"] == 2 and scores["set_confusion_share"] == pytest.approx(2 / 5)
    # Without the sets, no confusion figures; a marked word in no set never counts as confused.
    assert "set_confusions" not in homophone_accuracy(references, predictions, [[1, 4], [1, 3], [0]])
    assert homophone_accuracy(["the cat sat"], ["the bat sat"], [[1]], sets=sets)["set_confusions"] == 0
