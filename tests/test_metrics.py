import random

import evaluate
import jiwer
import pytest

from modeling_uot_ctc.metrics import CER_PATH, WER_PATH


def random_sentence(rng, allow_empty):
    words = ["".join(rng.choice("abcde ") for _ in range(rng.randint(1, 6))).strip() or "a"
             for _ in range(rng.randint(0 if allow_empty else 1, 8))]
    return " ".join(words)


@pytest.mark.parametrize("seed", range(5))
def test_local_modules_agree_with_jiwer(seed):
    rng = random.Random(seed)
    references = [random_sentence(rng, allow_empty=False) for _ in range(40)]
    predictions = [random_sentence(rng, allow_empty=True) for _ in range(40)]
    predictions[:3] = ["", "", ""]  # empty hypotheses are legal
    wer = evaluate.load(WER_PATH).compute(predictions=predictions, references=references)
    cer = evaluate.load(CER_PATH).compute(predictions=predictions, references=references)
    assert wer == pytest.approx(jiwer.wer(references, predictions))
    assert cer == pytest.approx(jiwer.cer(references, predictions))


def test_known_values():
    assert evaluate.load(WER_PATH).compute(predictions=["the cat sat"], references=["the cat sat down"]) == 0.25
    assert evaluate.load(CER_PATH).compute(predictions=["abd"], references=["abcd"]) == 0.25
