"""The experiment runner and its report: rows, word-level alignment scoring, evaluation, tables (offline, tiny)."""

import csv
import json
import os

import jiwer
import numpy as np
import pytest
import soundfile
import torch
from transformers import BertTokenizerFast, pipeline

from modeling_uot_ctc.data import frame_timing
from modeling_uot_ctc.diagnostics import frame_fit_spread

import report
import run_experiments as experiments
import run_speech_recognition_uot as script
from script_fixtures import SENTENCES, TINY_MODEL, base_arguments, speech_like, write_teacher

CHARACTER_SECONDS = 0.07  # speech_like's pace


def test_every_row_is_a_valid_script_command():
    names = set()
    for row in experiments.ROWS.values():
        model_args, data_args, transfer_args, _, training_args = script.parse_arguments(row.train_argv(7))
        assert training_args.seed == 7
        assert training_args.output_dir == os.path.join("outputs/experiments", row.name, "seed7")
        assert transfer_args.aligner == row.flags["aligner"]
        for key, value in row.flags.items():
            assert getattr(transfer_args, key) == value
        expected_dir = {
            "padded": "data/demo_corpus_padded", "target": "data/transfer_target",
            "target-tune": "data/transfer_target_tune",
        }.get(row.regime, "data/demo_corpus")
        assert data_args.data_dir == expected_dir
        assert data_args.max_train_samples == (
            experiments.LOW_RESOURCE_SAMPLES if row.regime == "low-resource" else None
        )
        if row.regime.startswith("target"):
            # Every stage-2 row fine-tunes the stage-1 base model for the same number of steps.
            assert model_args.model_name_or_path == "outputs/transfer/base/plain"
            assert training_args.max_steps == 200
            assert row.seeds == ((0, 1, 2, 3, 4) if row.regime == "target" else (0,))
        else:
            assert training_args.max_steps == 800  # equal steps for every row
        names.add(row.name)
    assert {"target_ctc", "target_oracle", "target_diagonal", "target_uot_cosine", "target_uot_anchor"} <= names
    # The rows: CTC, balanced OT, temporal-order OT, several rho_frames, a kt_weight sweep, both hard regimes.
    for name in (
        "ctc",
        "ot",
        "tot",
        "uot_rho0.1",
        "uot_rho1.0",
        "uot_rho10.0",
        "uot_rho1.0_kt0.1",
        "uot_rho1.0_kt2.0",
        "padded_ctc",
        "padded_ot",
        "padded_uot_rho1.0",
        "low_ctc",
        "low_ot",
        "low_uot_rho1.0",
    ):
        assert name in names


def test_word_reference_marks_the_frames_inside_each_word():
    words = [["a", 0.0, 0.1], ["bc", 0.1, 0.3]]
    reference = experiments.word_reference(20, words, hop=0.02, first_centre=0.01).tolist()
    # Centres at 10, 30, 50 ... ms: five in the first word, ten in the second, the rest in none.
    assert reference == [0] * 5 + [1] * 10 + [-1] * 5
    # Centres 15 ms later: the first word keeps frames 0..3 (10+15 ... 70+15 ms), the second 4..13.
    assert experiments.word_reference(20, words, 0.02, 0.025).tolist() == [0] * 4 + [1] * 10 + [-1] * 6


def test_frame_timing_follows_the_front_end():
    from types import SimpleNamespace

    # wav2vec2-base: 400-sample receptive field, 320-sample hop (20 ms), first centre at 199.5 samples.
    base = SimpleNamespace(conv_kernel=[10, 3, 3, 3, 3, 2, 2], conv_stride=[5, 2, 2, 2, 2, 2, 2])
    assert frame_timing(base) == pytest.approx((0.02, 199.5 / 16_000))
    # configs/experiments.yaml: kernels 20, 8, 4, 4, strides 10, 4, 4, 2: 20 + 7*10 + 3*40 + 3*160 = 690 samples.
    small = SimpleNamespace(conv_kernel=[20, 8, 4, 4], conv_stride=[10, 4, 4, 2])
    assert frame_timing(small) == pytest.approx((0.02, 344.5 / 16_000))


def test_word_pieces_map_to_whitespace_words(tmp_path):
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "the", "air", "cl", "##ean", "'", "s"]
    (tmp_path / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tokenizer = BertTokenizerFast(vocab=str(tmp_path / "vocab.txt"), do_lower_case=True)
    # "clean" is two pieces; "air's" is three (the apostrophe splits it).
    assert tokenizer.tokenize("the clean air's") == ["the", "cl", "##ean", "air", "'", "s"]
    assert experiments.token_words(tokenizer, "the clean air's") == [0, 1, 1, 2, 2, 2]


def test_plan_is_scored_per_word_against_the_timings():
    # Three pieces: piece 0 is word 0; pieces 1 and 2 are word 1. Four frames, the last one silence.
    onehot = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])
    reference = torch.tensor([0, 1, 1, -1])
    plan = torch.zeros(4, 3)
    plan[0, 0] = plan[1, 0] = plan[2, 2] = plan[3, 1] = 0.25  # frame 1 goes to the wrong word
    store = {k: [] for k in experiments.SCORES}
    experiments.score_plans(store, plan[None], [(onehot, reference)], torch.ones(1, 4, dtype=torch.bool))
    # Assigned frames 0..3; right: frames 0 and 2 -> precision 2/4. Reference frames 0..2; right: 0 and 2 -> 2/3.
    assert store["precision"] == [pytest.approx(0.5)]
    assert store["recall"] == [pytest.approx(2 / 3)]
    assert store["dropped"] == [0.0] and store["mass"] == [pytest.approx(1.0)]
    # Every frame carries its share; a quarter of the mass sits on the silence frame.
    assert store["effective_frames"] == [pytest.approx(1.0)] and store["mass_outside_words"] == [pytest.approx(0.25)]

    plan[3, 1] = 0.0  # the silence frame now drops out: precision 2/3, recall unchanged
    store = {k: [] for k in experiments.SCORES}
    experiments.score_plans(store, plan[None], [(onehot, reference)], torch.ones(1, 4, dtype=torch.bool))
    assert store["precision"] == [pytest.approx(2 / 3)] and store["recall"] == [pytest.approx(2 / 3)]
    assert store["dropped"] == [pytest.approx(0.25)]
    # Three equal frames out of four: perplexity 3, three quarters of the frames; nothing on the silence.
    assert store["effective_frames"] == [pytest.approx(0.75)] and store["mass_outside_words"] == [0.0]


def test_diagonal_plans_cut_the_valid_frames_in_order():
    frame_mask = torch.tensor([[True] * 6, [True] * 4 + [False] * 2])
    token_mask = torch.tensor([[True, True, True], [True, True, False]])
    plans = experiments.diagonal_plans(frame_mask, token_mask)
    assert plans[0].argmax(-1).tolist() == [0, 0, 1, 1, 2, 2]
    assert plans[1, :4].argmax(-1).tolist() == [0, 0, 1, 1] and plans[1, 4:].abs().sum() == 0
    assert plans[1, :, 2].abs().sum() == 0 and plans.sum((1, 2)).tolist() == pytest.approx([1.0, 1.0])


def write_timed_corpus(root, seed=0):
    """speech_like audio with exact word timings (70 ms a character), half the test voices marked unseen."""
    rng = np.random.default_rng(seed)
    for split, sentences in (("train", SENTENCES[:8]), ("test", SENTENCES[8:])):
        os.makedirs(os.path.join(root, split), exist_ok=True)
        rows = []
        for k, sentence in enumerate(sentences):
            name = f"{split}_{k:03d}.wav"
            soundfile.write(os.path.join(root, split, name), speech_like(sentence, rng), 16_000)
            words, position = [], 0
            for word in sentence.split():
                start = sentence.index(word, position)
                words.append([word, start * CHARACTER_SECONDS, (start + len(word)) * CHARACTER_SECONDS])
                position = start + len(word)
            rows.append(
                {
                    "file_name": name,
                    "text": sentence,
                    "seen_voice": str(split == "train" or k % 2 == 0),
                    "words": json.dumps(words),
                }
            )
        with open(os.path.join(root, split, "metadata.csv"), "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    return root


def test_evaluation_agrees_with_the_pipeline_and_jiwer(tmp_path):
    corpus = write_timed_corpus(str(tmp_path / "corpus"))
    teacher = write_teacher(str(tmp_path / "teacher"))
    output_dir = str(tmp_path / "run")
    # A group-norm front end, as in configs/experiments.yaml, whose frames depend on padding; the script evaluates
    # one utterance per batch, so its predictions differ in length across batches.
    model_config = json.dumps({**TINY_MODEL, "feat_extract_norm": "group"})
    script.main(
        base_arguments(
            corpus,
            teacher,
            output_dir,
            max_steps=3,
            chars_to_ignore=None,
            model_config=model_config,
            per_device_eval_batch_size=1,
        )
    )
    metrics = experiments.evaluate_run(output_dir, corpus, teacher_cache_dir=str(tmp_path / "cache"))

    asr = pipeline("automatic-speech-recognition", model=output_dir, device=-1)
    with open(os.path.join(corpus, "test", "metadata.csv"), newline="") as handle:
        rows = list(csv.DictReader(handle))
    audio = [soundfile.read(os.path.join(corpus, "test", row["file_name"]), dtype="float32")[0] for row in rows]
    hypotheses = [asr(samples)["text"] for samples in audio]
    saved = json.load(open(os.path.join(output_dir, "experiment_predictions.json")))
    assert [saved[row["file_name"]] for row in rows] == hypotheses
    references = [row["text"] for row in rows]
    # The script's own evaluation (batches of 4) decodes each utterance over its own frames too.
    script_results = json.load(open(os.path.join(output_dir, "eval_results.json")))
    assert script_results["eval_wer"] == pytest.approx(metrics["wer"])
    assert script_results["eval_cer"] == pytest.approx(metrics["cer"])
    assert metrics["wer"] == pytest.approx(jiwer.wer(references, hypotheses))
    assert metrics["cer"] == pytest.approx(jiwer.cer(references, hypotheses))
    seen = [i for i, row in enumerate(rows) if row["seen_voice"] == "True"]
    unseen = [i for i in range(len(rows)) if i not in seen]
    for name, chosen in (("seen", seen), ("unseen", unseen)):
        expected = jiwer.wer([references[i] for i in chosen], [hypotheses[i] for i in chosen])
        assert metrics[f"wer_{name}"] == pytest.approx(expected)
    assert "homophones" not in metrics

    # Every word marked as a homophone: the words spelt right are jiwer's hits.
    for row in rows:
        row["homophones"] = json.dumps(list(range(len(row["text"].split()))))
    with open(os.path.join(corpus, "test", "metadata.csv"), "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    marked = experiments.evaluate_run(output_dir, corpus, teacher_cache_dir=str(tmp_path / "cache"))["homophones"]
    counts = jiwer.process_words(references, hypotheses)
    assert marked["homophone_right"] == counts.hits
    assert marked["homophone_words"] == counts.hits + counts.substitutions + counts.deletions

    assert 0 <= metrics["alignment"]["precision"] <= 1 and 0 <= metrics["alignment"]["recall"] <= 1
    for eps in experiments.SWEEP_EPS:
        curve = [point for point in metrics["rho_sweep"] if point["eps"] == eps]
        assert [p["rho_frames"] for p in curve] == [*experiments.RHO_GRID[:-1], None]
        balanced = curve[-1]  # rho inf: every frame keeps its share
        assert balanced["dropped"] == 0 and balanced["mass"] == pytest.approx(1.0, abs=1e-3)
        assert balanced["effective_frames"] == pytest.approx(1.0, abs=1e-3)


def test_report_tables_spreads_and_plots(tmp_path):
    def run(wer, precision=None):
        metrics = {"wer": wer, "cer": wer / 2, "wer_seen": wer, "wer_unseen": wer + 0.1, "train_minutes": 4.0}
        if precision is not None:
            metrics["alignment"] = {k: 0.5 for k in experiments.SCORES} | {"precision": precision}
            metrics["alignment_diagonal"] = {k: 0.5 for k in experiments.SCORES}
            metrics["rho_sweep"] = [
                {"eps": e, "rho_frames": r, **{k: precision + e for k in experiments.SCORES}}
                for e in (0.1, 0.02)
                for r in (0.1, 1.0, None)
            ]
        return metrics

    found = {
        "ctc": {0: run(0.8), 1: run(0.9), 2: run(0.7)},
        "uot_rho1.0": {0: run(0.7, 0.3), 1: run(0.7, 0.5), 2: run(0.4, 0.4)},
    }
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "RESULTS.md").write_text(
        f"# Results\n\nProse before.\n\n{report.TABLE_START}\nold\n{report.TABLE_END}\n\nAfter.\n"
    )
    report.write_report(found, experiments.ROWS, str(docs))
    text = (docs / "RESULTS.md").read_text()
    assert text.startswith("# Results\n\nProse before.") and text.rstrip().endswith("After.") and "\nold\n" not in text
    recognition, alignment = [
        [cell.strip() for cell in line.split("|")[1:-1]]
        for line in text.splitlines()
        if line.startswith("| uot_rho1.0 |")
    ]
    assert recognition[3] == f"{np.mean([0.7, 0.7, 0.4]):.3f} ± {np.std([0.7, 0.7, 0.4], ddof=1):.3f}"
    # Paired with CTC seed by seed: -0.1, -0.2, -0.3 (WER) and half that (CER).
    # The 95 % interval: mean ± t(0.975, 2) sd / sqrt(3), t = 4.303 (scipy.stats.t.ppf(0.975, 2) = 4.3027).
    low, high = -0.2 - 4.303 * 0.1 / 3**0.5, -0.2 + 4.303 * 0.1 / 3**0.5
    assert recognition[7] == f"{-0.2:.3f} ± {0.1:.3f} [-0.100, -0.200, -0.300], 95 % CI {low:+.3f} to {high:+.3f}"
    assert recognition[8].startswith(f"{-0.1:.3f} ± {0.05:.3f} [-0.050, -0.100, -0.150], 95 % CI")
    assert alignment[1] == f"{0.4:.3f} ± {0.1:.3f}"  # precision over the seeds: 0.3, 0.5, 0.4
    sweep_line = next(line for line in text.splitlines() if line.startswith("| uot_rho1.0 (n=3) | 0.02 | inf"))
    assert sweep_line.count(f"{0.42:.3f} ± {0.1:.3f}") == 6  # the seeds' precision + eps: 0.32, 0.52, 0.42
    assert "not run yet" in next(line for line in text.splitlines() if line.startswith("| tot |"))
    for name in ("wer.png", "degree_of_matching.png"):
        image = __import__("matplotlib.pyplot").pyplot.imread(docs / "results" / name)
        assert image.shape[0] > 200 and image.shape[1] > 400 and image[..., :3].std() > 0.01


def test_finished_runs_are_read_back_and_unfinished_ones_evaluated_only(tmp_path, monkeypatch):
    monkeypatch.setattr(experiments, "RUNS_DIR", str(tmp_path))
    row = experiments.ROWS["uot_rho1.0"]
    calls = []

    def fake_run(argv, **kwargs):
        calls.append(argv[1:3])
        if argv[2] == "evaluate":  # what `evaluate` leaves behind
            with open(os.path.join(argv[3], "experiment_metrics.json"), "w") as handle:
                json.dump({"wer": 0.5}, handle)

    monkeypatch.setattr(experiments.subprocess, "run", fake_run)
    finished = tmp_path / "uot_rho1.0" / "seed0"
    finished.mkdir(parents=True)
    (finished / "experiment_metrics.json").write_text(json.dumps({"wer": 0.25}))
    assert experiments.run_one(row, 0, log=lambda _: None) == {"wer": 0.25} and calls == []

    trained = tmp_path / "uot_rho1.0" / "seed1"  # trained, but interrupted before its evaluation
    trained.mkdir(parents=True)
    (trained / "train_results.json").write_text("{}")
    assert experiments.run_one(row, 1, log=lambda _: None) == {"wer": 0.5}
    assert calls == [[experiments.__file__, "evaluate"]]

    calls.clear()  # nothing there yet: train, then evaluate
    experiments.run_one(row, 2, log=lambda _: None)
    assert calls == [["run_speech_recognition_uot.py", experiments.BASE_CONFIG], [experiments.__file__, "evaluate"]]

    calls.clear()  # a changed evaluation: evaluate the finished run again, keep its training
    (finished / "train_results.json").write_text("{}")
    assert experiments.run_one(row, 0, log=lambda _: None, reevaluate=True) == {"wer": 0.5}
    assert calls == [[experiments.__file__, "evaluate"]]


def test_frame_fit_spread_is_zero_for_equal_frames_and_grows_with_a_misfit():
    eps = 0.1
    cost = torch.full((2, 4, 3), 0.5)
    cost[1, 3] = 0.5 + 4 * eps  # one frame fits every token 4 eps worse than the others
    masks = torch.ones(2, 4, dtype=torch.bool), torch.ones(2, 3, dtype=torch.bool)
    spreads = frame_fit_spread(cost, *masks, eps).tolist()
    assert spreads[0] == pytest.approx(0.0, abs=1e-6)
    assert spreads[1] == pytest.approx(float(torch.tensor([0.0, 0.0, 0.0, 4.0]).std()), rel=1e-5)


def test_runs_of_an_older_evaluation_are_left_out(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(experiments, "RUNS_DIR", str(tmp_path))
    for seed, version in ((0, experiments.EVAL_VERSION), (1, experiments.EVAL_VERSION - 1), (2, None)):
        folder = tmp_path / "ctc" / f"seed{seed}"
        folder.mkdir(parents=True)
        metrics = {"wer": 0.5} if version is None else {"wer": 0.5, "eval_version": version}
        (folder / "experiment_metrics.json").write_text(json.dumps(metrics))
    found = experiments.load_run_metrics([experiments.ROWS["ctc"]], [0, 1, 2])
    assert list(found["ctc"]) == [0]
    assert "ctc seed 1, ctc seed 2" in capsys.readouterr().out


def test_a_run_another_runner_holds_is_skipped(tmp_path, monkeypatch):
    import subprocess as real_subprocess

    monkeypatch.setattr(experiments, "RUNS_DIR", str(tmp_path))
    calls = []
    monkeypatch.setattr(experiments.subprocess, "run", lambda argv, **kwargs: calls.append(argv))
    folder = tmp_path / "ctc" / "seed0"
    folder.mkdir(parents=True)
    other = real_subprocess.Popen(["sleep", "60"])
    try:
        (folder / "running.pid").write_text(str(other.pid))
        assert experiments.run_one(experiments.ROWS["ctc"], 0, log=lambda _: None) is None and calls == []
    finally:
        other.kill()
        other.wait()
    # The other runner is gone: its lock no longer counts, and this runner's own lock is removed afterwards.
    with pytest.raises(FileNotFoundError):  # the fake subprocess writes no metrics
        experiments.run_one(experiments.ROWS["ctc"], 0, log=lambda _: None)
    assert len(calls) == 2 and not (folder / "running.pid").exists()


def test_the_tuning_split_holds_out_training_utterances_only(tmp_path):
    """Settings are chosen on utterances of the target's training split, never on its test split."""
    source = tmp_path / "target"
    for split, count in (("train", 12), ("test", 4)):
        (source / split).mkdir(parents=True)
        for k in range(count):
            soundfile.write(str(source / split / f"{split}_{k:02d}.wav"), np.zeros(1600, dtype=np.float32), 16_000)
        with open(source / split / "metadata.csv", "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=["file_name", "text"])
            writer.writeheader()
            writer.writerows({"file_name": f"{split}_{k:02d}.wav", "text": f"t {k}"} for k in range(count))
    experiments.write_tuning_split(str(source), str(tmp_path / "tune"), n_valid=3)
    split_files = {}
    for split in ("train", "test"):
        with open(tmp_path / "tune" / split / "metadata.csv", newline="") as handle:
            names = [row["file_name"] for row in csv.DictReader(handle)]
        # Each path leads to an existing file of the source's training split.
        assert all(os.path.isfile(tmp_path / "tune" / split / name) and "/train/train_" in name for name in names)
        split_files[split] = {os.path.basename(name) for name in names}
    assert len(split_files["test"]) == 3 and len(split_files["train"]) == 9
    assert not split_files["test"] & split_files["train"]


def test_transfer_table_pairs_by_seed_and_gives_the_relative_change():
    rows = {name: row for name, row in experiments.ROWS.items() if row.regime == "target"}
    plan = {"precision": 0.7, "recall": 0.2, "dropped": 0.8, "mass_outside_words": 0.01}
    tools = {"token_discrimination": 0.4, "discrimination_chance": 0.2, "frames_per_token": 9.0}
    found = {
        "target_ctc": {0: {"cer": 0.20, "wer": 0.6}, 1: {"cer": 0.30, "wer": 0.7}},
        "target_uot_anchor": {
            0: {"cer": 0.18, "wer": 0.6, "alignment": plan, "instruments": tools},
            1: {"cer": 0.27, "wer": 0.7, "alignment": plan, "instruments": tools},
        },
    }
    text = report.transfer_table(found, rows, "target", "target_ctc")
    line = next(line for line in text.splitlines() if line.startswith("| target_uot_anchor "))
    # Paired differences -0.02 and -0.03: mean -0.025, which is -10 % of CTC's mean CER 0.25.
    assert "[-0.0200, -0.0300]" in line and "-10.0%" in line
    assert "0.400 ± 0.000 (0.20)" in line
    assert "| target_oracle | 0 | not run yet |" in text


def test_lm_table_compares_every_decoding_with_ctc_greedy_paired_by_seed():
    def run(greedy_wer, lm_wer, greedy_cer=0.25, lm_cer=0.2):
        return {"greedy": {"wer": greedy_wer, "cer": greedy_cer, "seconds_per_audio_second": 0.0001},
                "lm": {"wer": lm_wer, "cer": lm_cer, "seconds_per_audio_second": 0.005},
                "alpha": 0.5, "beta": 0.0, "validation_wer": 0.4}

    found = {
        "target_ctc": {0: run(0.60, 0.40), 1: run(0.80, 0.50)},
        "target_uot_anchor": {0: run(0.60, 0.36), 1: run(0.80, 0.46)},
    }
    text = report.lm_table(found, ["target_ctc", "target_uot_anchor"])
    lines = {tuple(cell.strip() for cell in line.split("|")[1:3]): line for line in text.splitlines()[2:]}
    # CTC with the LM against CTC greedy: -0.20 and -0.30 against a mean of 0.70, -35.7 %.
    assert "-35.7%" in lines[("target_ctc", "3-gram LM")]
    assert "| – |" in lines[("target_ctc", "greedy")]
    # The transfer with the LM: -0.24 and -0.34, -41.4 %; the weights and the validation WER beside it.
    assert "-41.4%" in lines[("target_uot_anchor", "3-gram LM")] and "0.5, 0 (0.400)" in text
    # Both with the LM: -0.04 each against 0.45, -8.9 %.
    assert "WER -8.9%" in report.lm_contrast_line(found, "target_uot_anchor")
    assert "not run yet" in report.lm_table({}, ["target_ctc"])


def test_runs_go_seed_by_seed_so_that_pairs_finish_together(tmp_path, monkeypatch):
    monkeypatch.setattr(experiments, "RUNS_DIR", str(tmp_path))
    order = []
    monkeypatch.setattr(experiments, "run_one", lambda row, seed, reevaluate=False: order.append((row.name, seed)))
    rows = [experiments.ROWS["ctc"], experiments.ROWS["ot"]]
    experiments.run_many(rows, [0, 1], jobs=1)
    assert order == [("ctc", 0), ("ot", 0), ("ctc", 1), ("ot", 1)]
