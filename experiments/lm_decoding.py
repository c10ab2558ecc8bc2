"""N-gram decoding of the transfer experiments' stage-2 runs: what a user would pick instead of the transfer, on the
same trained models (docs/RESULTS.md, section 1, "Against what a user would pick instead").

    python experiments/run_experiments.py lm                 # target_ctc and target_uot_anchor, five seeds each
    python experiments/run_experiments.py lm-report          # their table in docs/RESULTS.md

One 3-gram model (KenLM) of WordNet's example sentences less every sentence of the target's test split and of the
LM's validation corpus; that corpus is 200 utterances of other sentences in the target's voices, padded as the
target is. For each run, the LM weight and the word bonus are chosen on it by WER, then the run's test split is
decoded greedily and with the LM from the same log-probabilities, one utterance at a time. Each run's figures go to
its `lm_metrics.json`; a run that has one is not decoded again.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import time

LM_VALID_CLEAN = "data/transfer_target_lm_valid_clean"
LM_VALID = "data/transfer_target_lm_valid"
LM_DIR = "outputs/transfer/language_model"
LM_ORDER = 3
ALPHAS = (0.25, 0.5, 1.0, 1.5)
BETAS = (-1.0, 0.0, 1.0, 2.0)
LM_ROWS = ("target_ctc", "target_uot_anchor")
# Sentences after those of the base corpus (8000) and of the target (600), in the voices of the target.
CORPUS_COMMANDS = {
    LM_VALID_CLEAN: f"python -m modeling_uot_ctc.corpus --output {LM_VALID_CLEAN} --utterances 200 "
    "--test-fraction 0.5 --voices target --skip-sentences 8600 --seed 0",
    LM_VALID: f"python -m modeling_uot_ctc.corpus --pad-from {LM_VALID_CLEAN} --output {LM_VALID} --seed 0",
}


def prepare(root: str, test_corpus: str, tokenizer_folder: str, chars_to_ignore, log=print) -> None:
    """Build the LM's validation corpus and the language model (in LM_DIR), unless they are there."""
    for folder, command in CORPUS_COMMANDS.items():
        if not os.path.isfile(os.path.join(root, folder, "test", "metadata.csv")):
            log(f"building {folder}: {command}")
            subprocess.run([sys.executable, *shlex.split(command)[1:]], cwd=root, check=True)
    if os.path.isfile(os.path.join(root, LM_DIR, "alphabet.json")):
        return
    from transformers import AutoTokenizer

    from modeling_uot_ctc.corpus import read_corpus, wordnet_sentences
    from modeling_uot_ctc.language_model import build_language_model, text_without

    held_out = [r["text"] for r in read_corpus(os.path.join(root, test_corpus), ["test"])]
    held_out += [r["text"] for r in read_corpus(os.path.join(root, LM_VALID))]
    text = text_without(wordnet_sentences(), held_out, chars_to_ignore)
    os.makedirs(os.path.join(root, LM_DIR), exist_ok=True)
    with open(os.path.join(root, LM_DIR, "text.txt"), "w", encoding="utf-8") as handle:
        handle.write("\n".join(text) + "\n")
    log(f"building a {LM_ORDER}-gram model of {len(text)} sentences in {LM_DIR}")
    build_language_model(text, os.path.join(root, LM_DIR), AutoTokenizer.from_pretrained(tokenizer_folder), LM_ORDER)


def decode_run(folder: str, test_corpus: str, root: str, chars_to_ignore) -> dict:
    """Greedy and LM decoding of one run's test split, the LM's weights chosen on the validation corpus; writes and
    returns the run's `lm_metrics.json`."""
    import jiwer
    from transformers import Wav2Vec2Processor

    from modeling_uot_ctc import Wav2Vec2ForCTCWithUOT
    from modeling_uot_ctc.corpus import read_corpus
    from modeling_uot_ctc.data import SAMPLING_RATE, decode_audio, normalise_text
    from modeling_uot_ctc.language_model import choose_weights, decode, load_decoder
    from modeling_uot_ctc.transcribe import greedy, log_probs

    model = Wav2Vec2ForCTCWithUOT.from_pretrained(folder)
    processor = Wav2Vec2Processor.from_pretrained(folder)

    def scored(rows):
        audio = [decode_audio(r["path"], where=r["file_name"]) for r in rows]
        features = [processor.feature_extractor(a, sampling_rate=SAMPLING_RATE).input_values[0] for a in audio]
        references = [normalise_text(r["text"], chars_to_ignore, True) for r in rows]
        return log_probs(model, features), references, sum(len(a) for a in audio) / SAMPLING_RATE

    validation, validation_refs, _ = scored(read_corpus(os.path.join(root, LM_VALID)))
    test, test_refs, seconds = scored(read_corpus(os.path.join(root, test_corpus), ["test"]))
    decoder = load_decoder(os.path.join(root, LM_DIR), processor.tokenizer)
    choice = choose_weights(decoder, validation, validation_refs, ALPHAS, BETAS)
    started = time.perf_counter()
    greedy_texts = greedy(processor.tokenizer, test)
    greedy_seconds = time.perf_counter() - started
    started = time.perf_counter()
    lm_texts = decode(decoder, test)
    lm_seconds = time.perf_counter() - started
    metrics = {
        "greedy": {"wer": jiwer.wer(test_refs, greedy_texts), "cer": jiwer.cer(test_refs, greedy_texts),
                   "seconds_per_audio_second": greedy_seconds / seconds},
        "lm": {"wer": jiwer.wer(test_refs, lm_texts), "cer": jiwer.cer(test_refs, lm_texts),
               "seconds_per_audio_second": lm_seconds / seconds},
        "alpha": choice["alpha"], "beta": choice["beta"], "validation_wer": choice["wer"],
        "test_utterances": len(test_refs), "validation_utterances": len(validation_refs),
    }
    with open(os.path.join(folder, "lm_metrics.json"), "w", encoding="utf-8") as handle:
        json.dump(metrics, handle, indent=1)
    return metrics


def load_lm_metrics(run_dirs: dict) -> dict:
    """`{row: {seed: lm_metrics}}` of the runs that have them; `run_dirs` maps `(row, seed)` to a run's folder."""
    found = {}
    for (row, seed), folder in run_dirs.items():
        path = os.path.join(folder, "lm_metrics.json")
        if os.path.isfile(path):
            with open(path, encoding="utf-8") as handle:
                found.setdefault(row, {})[seed] = json.load(handle)
    return found
