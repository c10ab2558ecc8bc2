"""`make demo`'s script end to end at a tiny size: corpus, shared start, two fine-tuned rows, scores, transcripts,
plan picture."""

import json
import os
import sys

import pytest
from PIL import Image

from script_fixtures import TINY_MODEL

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "scripts"))

import run_demo  # noqa: E402
from modeling_uot_ctc.corpus import read_corpus  # noqa: E402

# Sixty distinct sentences: forty for the tiny corpus, ten for its validation corpus, ten only the language model has.
SENTENCES = [f"{who} {does} the {what}" for who in ("she", "he", "they", "we", "the cat")
             for does in ("opened", "found", "closed") for what in ("door", "book", "window", "letter")]


def test_demo_runs_end_to_end_at_a_tiny_size(tmp_path, capsys):
    sentences = tmp_path / "sentences.txt"
    sentences.write_text("\n".join(SENTENCES) + "\n")
    outputs, corpus, validation = tmp_path / "outputs", tmp_path / "corpus", tmp_path / "validation"
    results = run_demo.main([
        "--utterances", "40", "--start-steps", "3", "--steps", "2", "--corpus", str(corpus),
        "--validation", str(validation), "--validation-utterances", "10",
        "--sentences", str(sentences), "--outputs", str(outputs),
        "--", "--model_config", json.dumps(TINY_MODEL), "--per_device_train_batch_size", "4",
        "--save_strategy", "no", "--report_to", "none",
    ])
    printed = capsys.readouterr().out

    # The shared start, then both rows for the same number of steps from it.
    steps = {name: json.load(open(outputs / name / "trainer_state.json"))["global_step"]
             for name in ("demo_start", "demo_ctc", "demo_uot")}
    assert steps == {"demo_start": 3, "demo_ctc": 2, "demo_uot": 2}
    configs = {name: json.load(open(outputs / name / "config.json")) for name in ("demo_ctc", "demo_uot")}
    assert configs["demo_ctc"]["aligner"] == "none" and configs["demo_uot"]["aligner"] == "uot"
    assert configs["demo_uot"]["teacher_hidden_size"] == 384  # the MiniLM teacher

    # The language model: the sentences of neither the test split nor the validation corpus, in both rows' folders,
    # with weights chosen on the validation corpus.
    test_text = {row["text"] for row in read_corpus(str(corpus), ["test"])}
    validation_text = {row["text"] for row in read_corpus(str(validation))}
    lm_text = set((outputs / "demo_lm_text.txt").read_text().splitlines())
    assert lm_text == set(SENTENCES) - test_text - validation_text and len(validation_text) == 10
    for name in ("demo_ctc", "demo_uot"):
        evaluation = json.load(open(outputs / name / "eval_results.json"))
        assert {"eval_wer_lm", "eval_cer_lm"} <= set(evaluation)
        attrs = json.load(open(outputs / name / "language_model" / "attrs.json"))
        assert attrs["alpha"] == json.load(open(outputs / name / "all_results.json"))["lm_alpha"]

    # Scores of heard and unheard voices, greedy and with the language model, as printed and as saved.
    assert set(results) == {"CTC only, greedy", "CTC only, with LM", "UOT-KT, greedy", "UOT-KT, with LM"}
    saved = json.load(open(outputs / "demo_results.json"))
    for name, row in results.items():
        assert row == saved[name]
        assert row["heard_count"] > 0 and row["unheard_count"] > 0
        assert row["heard_count"] + row["unheard_count"] == row["all_count"]
        for key in ("heard_cer", "unheard_cer", "heard_wer", "unheard_wer"):
            assert 0.0 <= row[key] and f"{row[key]:.3f}" in printed, key
    assert "CER heard" in printed and "CER unheard" in printed

    # Transcripts from the stock pipeline, heard and unheard voices, and the plan picture.
    assert printed.count("reference:") == printed.count("pipeline:") == printed.count("with LM:") >= 2
    assert "[heard voice" in printed and "[unheard voice" in printed
    picture = outputs / "demo_uot" / "alignment.png"
    Image.open(picture).verify()
    assert str(picture) in printed


@pytest.mark.parametrize("logged, expected", [
    ([], "preparing"),
    ([{"loss": "2.5", "ctc_loss": "2.0", "kt_loss": "1.0", "epoch": "0.1"}], "step 25/100, ctc_loss 2.000, kt_loss 1.000"),
])
def test_progress_line_reads_the_trainer_log(tmp_path, logged, expected):
    log = tmp_path / "run.log"
    log.write_text("some warning\n" + "".join(f"{entry}\n" for entry in logged))
    line = run_demo.progress("UOT-KT", str(log), steps=100, elapsed=60.0)
    assert line.startswith("UOT-KT: " + expected)
    if logged:
        assert "3.0 min left" in line  # 25 steps in a minute, 75 to go
