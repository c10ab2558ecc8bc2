"""Which n-gram decoder: pyctcdecode's open-vocabulary beam search against flashlight-text's lexicon decoder (the one
torchaudio wraps), on a trained model's real output, with the same KenLM models.

    pip install flashlight-text==0.0.7          # not a dependency of the project
    python benchmarks/lm_decoders.py --model outputs/demo_ctc --test data/demo_corpus --validation data/demo_validation

For each language-model text (the training transcripts; WordNet's example sentences less every test and validation
sentence) it estimates a 3-gram with KenLM, chooses each decoder's two weights on the validation corpus by WER, and
prints test WER and CER beside greedy decoding, with the decoders' time per second of audio (one thread, one
utterance at a time, the same log-probabilities for all). Writes the figures to `--output` (JSON).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import tempfile
import time

import jiwer
import numpy as np
import torch
import yaml

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from modeling_uot_ctc.corpus import read_corpus, wordnet_sentences  # noqa: E402
from modeling_uot_ctc.data import SAMPLING_RATE, decode_audio, normalise_text  # noqa: E402
from modeling_uot_ctc.language_model import decoder_labels, estimate_ngram, text_without  # noqa: E402
from modeling_uot_ctc.transcribe import greedy, log_probs  # noqa: E402

# The demo's normalisation of transcripts (configs/demo.yaml).
with open(os.path.join(REPO, "configs", "demo.yaml"), encoding="utf-8") as _handle:
    CHARS_TO_IGNORE = yaml.safe_load(_handle)["chars_to_ignore"]
BEAM = 32


def rows_of(corpus: str, splits) -> list[dict]:
    return [{**row, "reference": normalise_text(row["text"], CHARS_TO_IGNORE, True)}
            for row in read_corpus(corpus, splits)]


def pyctcdecode_search(labels, binary, words):
    from pyctcdecode import build_ctcdecoder

    decoder = build_ctcdecoder(labels, kenlm_model_path=binary, unigrams=sorted(words))

    def run(scores, alpha, beta):
        decoder.reset_params(alpha=float(alpha), beta=float(beta))
        return [decoder.decode(s, beam_width=BEAM) for s in scores]

    return run


def flashlight_search(labels, vocab, binary, words, delimiter, blank):
    from flashlight.lib.text.decoder import (
        CriterionType, KenLM, LexiconDecoder, LexiconDecoderOptions, SmearingMode, Trie,
    )
    from flashlight.lib.text.dictionary import Dictionary

    tokens = Dictionary()
    for label in labels:
        tokens.add_entry(label)
    word_dict = Dictionary()
    spellable = sorted(w for w in words if all(c in vocab for c in w))
    for word in spellable + ["<unk>"]:
        word_dict.add_entry(word)
    lm = KenLM(binary, word_dict)
    trie = Trie(len(labels), vocab[delimiter])
    start = lm.start(False)
    for word in spellable:
        _, score = lm.score(start, word_dict.get_index(word))
        trie.insert([vocab[c] for c in word], word_dict.get_index(word), score)
    trie.smear(SmearingMode.MAX)

    def run(scores, lm_weight, word_score):
        options = LexiconDecoderOptions(
            beam_size=BEAM, beam_size_token=len(labels), beam_threshold=25.0, lm_weight=lm_weight,
            word_score=word_score, unk_score=float("-inf"), sil_score=0.0, log_add=False,
            criterion_type=CriterionType.CTC,
        )
        decoder = LexiconDecoder(options, trie, lm, vocab[delimiter], blank, word_dict.get_index("<unk>"), [], False)
        texts = []
        for s in scores:
            s = np.ascontiguousarray(s, dtype=np.float32)
            best = decoder.decode(s.ctypes.data, s.shape[0], s.shape[1])[0]
            texts.append(" ".join(word_dict.get_entry(w) for w in best.words if w >= 0))
        return texts

    return run


def tuned(run, validation, references, grid):
    results = {pair: jiwer.wer(references, run(validation, *pair)) for pair in grid}
    return min(results.items(), key=lambda item: (item[1], item[0]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--test", required=True, help="corpus whose test split is scored")
    parser.add_argument("--validation", required=True, help="corpus whose splits choose the weights")
    parser.add_argument("--output", default=os.path.join(REPO, "outputs", "lm_decoders.json"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    from transformers import AutoProcessor

    from modeling_uot_ctc import Wav2Vec2ForCTCWithUOT

    model = Wav2Vec2ForCTCWithUOT.from_pretrained(args.model)
    processor = AutoProcessor.from_pretrained(args.model)
    tokenizer = processor.tokenizer
    test, validation = rows_of(args.test, ["test"]), rows_of(args.validation, ["train", "test"])

    def scores_of(rows):
        audio = [decode_audio(r["path"]) for r in rows]
        features = [processor.feature_extractor(a, sampling_rate=SAMPLING_RATE).input_values[0] for a in audio]
        return log_probs(model, features), sum(len(a) for a in audio) / SAMPLING_RATE

    test_scores, test_seconds = scores_of(test)
    validation_scores, _ = scores_of(validation)
    test_refs, validation_refs = [r["reference"] for r in test], [r["reference"] for r in validation]
    started = time.perf_counter()
    hypotheses = greedy(tokenizer, test_scores)
    figures = {"greedy": {"wer": jiwer.wer(test_refs, hypotheses), "cer": jiwer.cer(test_refs, hypotheses),
                          "seconds_per_audio_second": (time.perf_counter() - started) / test_seconds}}

    texts = {
        "training transcripts": [r["reference"] for r in rows_of(args.test, ["train"])],
        "WordNet less test and validation": text_without(
            wordnet_sentences(), [r["text"] for r in test + validation], CHARS_TO_IGNORE
        ),
    }
    labels = decoder_labels(tokenizer)
    vocab = tokenizer.get_vocab()
    test_words = [w for ref in test_refs for w in ref.split()]
    for name, text in texts.items():
        words = {w for line in text for w in line.split()}
        with tempfile.TemporaryDirectory() as work:
            binary = estimate_ngram(text, os.path.join(work, "3gram.bin"), order=3)
            searches = {
                "pyctcdecode": (pyctcdecode_search(labels, binary, words),
                                list(itertools.product((0.25, 0.5, 1.0, 1.5), (-1.0, 0.0, 1.0, 2.0)))),
                "flashlight-text": (flashlight_search(labels, vocab, binary, words, tokenizer.word_delimiter_token,
                                                      tokenizer.pad_token_id),
                                    list(itertools.product((0.5, 1.0, 1.5, 2.0, 3.0), (-3.0, -2.0, -1.0, 0.0, 1.0)))),
            }
            for decoder_name, (run, grid) in searches.items():
                (first, second), validation_wer = tuned(run, validation_scores, validation_refs, grid)
                started = time.perf_counter()
                hypotheses = run(test_scores, first, second)
                elapsed = time.perf_counter() - started
                figures[f"{decoder_name}, {name}"] = {
                    "wer": jiwer.wer(test_refs, hypotheses), "cer": jiwer.cer(test_refs, hypotheses),
                    "weights": [first, second], "validation_wer": validation_wer,
                    "seconds_per_audio_second": elapsed / test_seconds,
                    "test_words_outside_the_text": sum(w not in words for w in test_words) / len(test_words),
                    "sentences": len(text),
                }
    print(f"{len(test)} test utterances ({test_seconds / 60:.1f} min of audio); weights chosen on {len(validation)}")
    print(f"{'decoding':<52} {'WER':>6} {'CER':>6} {'s / s audio':>12} {'test OOV':>9}  weights (validation WER)")
    for name, row in figures.items():
        oov = f"{row['test_words_outside_the_text']:>9.3f}" if "weights" in row else " " * 9
        extra = f"  {row['weights']} ({row['validation_wer']:.3f})" if "weights" in row else ""
        speed = row["seconds_per_audio_second"]
        print(f"{name:<52} {row['wer']:>6.3f} {row['cer']:>6.3f} {speed:>12.4f} {oov}{extra}")
    os.makedirs(os.path.dirname(args.output), exist_ok=True)
    with open(args.output, "w") as handle:
        json.dump(figures, handle, indent=1)


if __name__ == "__main__":
    main()
