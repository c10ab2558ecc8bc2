"""The transfer map (experiments/transfer_map.py): its corpora, rows, step choice, gate, orchestration and report."""

import csv
import json
import os

import pytest

import run_experiments as runner
import run_speech_recognition_uot as script
import transfer_map


def write_homophone_corpus(root, n_train=12, n_test=4):
    """A homophone split (`homophones.json`, training sentences in a priority order unlike the file order) and a
    corpus of it whose rows point at nothing: the manifests only pass paths on."""
    priority = [f"sentence {k}" for k in range(n_train)]
    description = {"train": [{"text": text, "positions": [0]} for text in priority],
                   "test": [{"text": f"test {k}", "positions": [0]} for k in range(n_test)]}
    (root / "homophones").mkdir()
    (root / "homophones" / "homophones.json").write_text(json.dumps(description))
    # The corpus builder's files follow its own shuffle, not the priority order: reversed here.
    for split, texts in (("train", priority[::-1]), ("test", [e["text"] for e in description["test"]])):
        (root / "corpus" / split).mkdir(parents=True)
        with open(root / "corpus" / split / "metadata.csv", "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=["file_name", "text", "homophones"])
            writer.writeheader()
            writer.writerows({"file_name": f"{split}_{k:02d}.wav", "text": t, "homophones": "[0]"}
                             for k, t in enumerate(texts))
    return priority


def read_split(folder, split):
    with open(os.path.join(folder, split, "metadata.csv"), newline="") as handle:
        return list(csv.DictReader(handle))


@pytest.fixture
def homophone_data(tmp_path, monkeypatch):
    priority = write_homophone_corpus(tmp_path)
    monkeypatch.setattr(transfer_map, "HOMOPHONE_DIR", str(tmp_path / "homophones"))
    monkeypatch.setattr(transfer_map, "HOMOPHONE_CORPUS", str(tmp_path / "corpus"))
    monkeypatch.setattr(transfer_map, "MAP_DATA", str(tmp_path / "map"))
    monkeypatch.setattr(transfer_map, "VALID_SENTENCES", 3)
    return priority


def test_a_cell_trains_on_the_first_sentences_and_validates_on_held_out_ones(homophone_data):
    small = transfer_map.Cell("small", "four sentences", 4)
    every = transfer_map.Cell("every", "all twelve", 12)
    for cell in (small, every):
        transfer_map.write_cell_corpora(runner, cell)
        texts = {(folder, split): [r["text"] for r in read_split(folder, split)]
                 for folder in (cell.corpus, cell.tune_corpus) for split in ("train", "test")}
        # The cell's training set: the first k sentences of the priority order, whatever the file order.
        assert sorted(texts[cell.corpus, "train"]) == sorted(homophone_data[: cell.train_sentences])
        assert texts[cell.corpus, "test"] == [f"test {k}" for k in range(4)]
        # Validation: the last three training sentences, never trained on while the step count is chosen.
        assert sorted(texts[cell.tune_corpus, "test"]) == sorted(homophone_data[-3:])
        assert not set(texts[cell.tune_corpus, "train"]) & set(texts[cell.tune_corpus, "test"])
        assert len(texts[cell.tune_corpus, "train"]) == min(cell.train_sentences, 12 - 3)
        # Every manifest path leads back to the corpus's file of that row.
        for folder in (cell.corpus, cell.tune_corpus):
            for split in ("train", "test"):
                for row in read_split(folder, split):
                    target = os.path.normpath(os.path.join(folder, split, row["file_name"]))
                    source_split = "test" if row["text"].startswith("test") else "train"
                    assert target.endswith(os.path.join("corpus", source_split, os.path.basename(target)))
                    assert row["homophones"] == "[0]"


def test_a_corpus_sentence_missing_from_the_split_is_refused(homophone_data, tmp_path):
    path = tmp_path / "corpus" / "train" / "metadata.csv"
    path.write_text(path.read_text().replace("sentence 5", "some other sentence"))
    with pytest.raises(ValueError, match="not in"):
        transfer_map.write_cell_corpora(runner, transfer_map.Cell("small", "", 4))


def test_every_map_row_is_a_valid_script_command_with_the_cells_step_count():
    for cell in (transfer_map.CELLS["homophones_100"], transfer_map.CELLS["homophones_400"]):
        tune = transfer_map.tune_row(runner, cell)
        _, data_args, transfer_args, _, training_args = script.parse_arguments(tune.train_argv(0))
        assert data_args.data_dir == cell.tune_corpus and transfer_args.aligner == "none"
        assert training_args.max_steps == transfer_map.TUNE_MAX_STEPS
        assert training_args.do_eval and training_args.eval_steps == transfer_map.TUNE_EVAL_STEPS
        assert training_args.lr_scheduler_type.value == "constant_with_warmup"
        aligners = {}
        for row in transfer_map.map_rows(runner, cell, 700):
            model_args, data_args, transfer_args, _, training_args = script.parse_arguments(row.train_argv(3))
            assert model_args.model_name_or_path == "outputs/transfer/base/plain"
            assert data_args.data_dir == cell.corpus
            assert training_args.max_steps == 700 and training_args.seed == 3
            assert training_args.lr_scheduler_type.value == "constant_with_warmup"
            assert training_args.output_dir == os.path.join(runner.RUNS_DIR, row.name, "seed3")
            assert row.command == f"python experiments/run_experiments.py map --cells {cell.name}"
            aligners[row.name.removeprefix(f"map_{cell.name}_")] = (
                transfer_args.aligner, transfer_args.alignment_anchor_weight, transfer_args.temporal_order_weight,
                transfer_args.kt_weight if transfer_args.aligner != "none" else None,
            )
        assert aligners == {
            "ctc": ("none", 0.0, 0.0, None), "oracle": ("oracle", 0.0, 0.0, 2.0),
            "uot_anchor": ("uot", 1.0, 1.0, 2.0), "ot_anchor": ("ot", 1.0, 1.0, 2.0), "tot": ("ot", 0.0, 1.0, 2.0),
        }


def test_the_from_scratch_cell_is_stage_1_with_the_transfer_after_the_warm_up():
    cell = transfer_map.CELLS["from_scratch"]
    for row in transfer_map.map_rows(runner, cell, transfer_map.chosen_steps(runner, cell)["steps"]):
        model_args, data_args, transfer_args, _, training_args = script.parse_arguments(row.train_argv(1))
        base_args = script.parse_arguments(list(runner.BASE_CONFIGS))
        # The base model's recipe (corpus, model, steps, learning rate), from random weights, nothing exported.
        assert model_args.model_name_or_path is None and not model_args.plain_model_dir
        assert model_args.model_config == base_args[0].model_config and data_args.data_dir == runner.BASE_CORPUS
        assert (training_args.max_steps, training_args.learning_rate) == (6000, base_args[4].learning_rate)
        assert transfer_args.kt_warmup_steps == (0 if transfer_args.aligner == "none" else 400)


def test_the_larger_student_starts_from_its_own_base():
    cell = transfer_map.CELLS["homophones_100_large"]
    folder, configs = cell.base(runner)
    model_args = script.parse_arguments(list(configs))[0]
    small = script.parse_arguments(list(runner.BASE_CONFIGS))[0]
    assert folder != runner.BASE_DIR and model_args.model_config["hidden_size"] > small.model_config["hidden_size"]
    for row in [transfer_map.tune_row(runner, cell), *transfer_map.map_rows(runner, cell, 300)]:
        model_args = script.parse_arguments(row.train_argv(0))[0]
        assert model_args.model_name_or_path == model_args.tokenizer_name_or_path == os.path.join(folder, "plain")


def test_the_word_piece_cell_gives_the_base_encoder_a_new_head_over_teacher_pieces():
    cell = transfer_map.CELLS["word_piece_units"]
    tune = transfer_map.tune_row(runner, cell)
    rows = [tune, *transfer_map.map_rows(runner, cell, 750, transfer_map.GATE_ROWS)]
    for row in rows:
        model_args, data_args, transfer_args, _, training_args = script.parse_arguments(row.train_argv(0))
        # The base's encoder, no tokenizer given (the script builds the word-piece vocabulary of the cell's text).
        assert model_args.model_name_or_path == "outputs/transfer/base/plain" and not model_args.tokenizer_name_or_path
        assert data_args.output_units == "word_pieces"
        assert data_args.word_piece_vocab_size == transfer_map.WORD_PIECE_VOCAB_SIZE
    _, _, _, _, training_args = script.parse_arguments(tune.train_argv(0))
    assert (training_args.max_steps, training_args.eval_steps) == (2000, 250) == cell.tune_steps
    # The other cells keep the module's step-count settings.
    assert transfer_map.CELLS["homophones_100"].tune_steps == (transfer_map.TUNE_MAX_STEPS, transfer_map.TUNE_EVAL_STEPS)


def test_the_word_piece_cell_holds_out_base_training_sentences_and_tests_on_the_base_test_split(tmp_path, monkeypatch):
    base = tmp_path / "base"
    for split, count in (("train", 10), ("test", 3)):
        (base / split).mkdir(parents=True)
        with open(base / split / "metadata.csv", "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=["file_name", "text"])
            writer.writeheader()
            writer.writerows({"file_name": f"{split}_{k:02d}.wav", "text": f"{split} {k}"} for k in range(count))
    monkeypatch.setattr(runner, "BASE_CORPUS", str(base))
    monkeypatch.setattr(transfer_map, "MAP_DATA", str(tmp_path / "map"))
    cell = transfer_map.Cell("pieces", "", output_units="word_pieces", valid_sentences=4)
    transfer_map.write_base_cell_corpora(runner, cell)
    texts = {(folder, split): sorted(r["text"] for r in read_split(folder, split))
             for folder in (cell.corpus, cell.tune_corpus) for split in ("train", "test")}
    assert texts[cell.corpus, "train"] == texts[cell.tune_corpus, "train"] == [f"train {k}" for k in range(6)]
    assert texts[cell.tune_corpus, "test"] == [f"train {k}" for k in range(6, 10)]
    assert texts[cell.corpus, "test"] == ["test 0", "test 1", "test 2"]
    for row in read_split(cell.tune_corpus, "test"):
        target = os.path.normpath(os.path.join(cell.tune_corpus, "test", row["file_name"]))
        assert target == os.path.normpath(str(base / "train" / row["file_name"].split("/")[-1]))


def write_tune_state(runs_dir, cell, curve):
    folder = runs_dir / f"map_{cell}_tune" / "seed0"
    folder.mkdir(parents=True)
    history = [{"step": step, "eval_cer": cer} for step, cer in curve] + [{"step": curve[-1][0], "loss": 1.0}]
    (folder / "trainer_state.json").write_text(json.dumps({"log_history": history}))


def test_the_step_count_is_the_step_of_lowest_validation_cer(tmp_path, monkeypatch):
    monkeypatch.setattr(runner, "RUNS_DIR", str(tmp_path))
    monkeypatch.setattr(transfer_map, "TUNE_MAX_STEPS", 500)
    cell = transfer_map.CELLS["homophones_100"]
    assert transfer_map.chosen_steps(runner, cell) is None
    # The minimum is reached twice: the earlier step counts. Rising afterwards: CTC alone overfits.
    write_tune_state(tmp_path, "homophones_100", [(100, 0.5), (200, 0.3), (300, 0.25), (400, 0.25), (500, 0.28)])
    choice = transfer_map.chosen_steps(runner, cell)
    assert (choice["steps"], choice["validation_cer"], choice["last_cer"]) == (300, 0.25, 0.28)


def test_an_unfinished_validation_run_chooses_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(runner, "RUNS_DIR", str(tmp_path))
    monkeypatch.setattr(transfer_map, "TUNE_MAX_STEPS", 500)
    write_tune_state(tmp_path, "homophones_100", [(100, 0.5), (200, 0.3)])
    assert transfer_map.chosen_steps(runner, transfer_map.CELLS["homophones_100"]) is None


def run_metrics(cer, homophone_accuracy=None, plan=None):
    metrics = {"eval_version": runner.EVAL_VERSION, "cer": cer, "wer": 2 * cer, "test_utterances": 200}
    if homophone_accuracy is not None:
        metrics["homophones"] = {"homophone_accuracy": homophone_accuracy, "control_accuracy": 0.5,
                                 "homophone_words": 223}
    if plan is not None:
        metrics["alignment"] = {"precision": plan, "recall": 0.2, "dropped": 0.3}
    return metrics


def test_the_gate_asks_for_a_gain_whose_interval_excludes_zero():
    cell = transfer_map.CELLS["homophones_100"]
    # CTC CER 0.30 on every seed, the oracle 0.27, 0.28, 0.28: -0.10, -0.0667, -0.0667 relative, mean -0.0778;
    # sd 0.01925, t(0.975, 2) 4.303: half-width 0.0478, so the interval is -0.1256 to -0.0300.
    found = {"map_homophones_100_ctc": {s: run_metrics(0.30, 0.40) for s in range(3)},
             "map_homophones_100_oracle": {0: run_metrics(0.27, 0.41), 1: run_metrics(0.28, 0.40),
                                           2: run_metrics(0.28, 0.42)}}
    gains = transfer_map.gains_against_ctc(found, cell)
    assert gains["relative_cer"] == pytest.approx(-0.07778, abs=1e-4)
    assert gains["relative_cer_ci"] == pytest.approx((-0.1256, -0.0300), abs=2e-4)
    assert gains["homophone_points"] == pytest.approx(0.01) and gains["passes"]
    # A larger mean gain whose seeds disagree in sign: its interval holds zero, the gate stays shut.
    found["map_homophones_100_oracle"] = {0: run_metrics(0.23, 0.40), 1: run_metrics(0.31, 0.40),
                                          2: run_metrics(0.26, 0.40)}
    gains = transfer_map.gains_against_ctc(found, cell)
    assert gains["relative_cer"] == pytest.approx(-0.1111, abs=1e-4) and gains["relative_cer_ci"][1] > 0
    assert not gains["passes"]
    # No CER gain, but five points more homophones right on every seed (4, 5, 6): passes on that alone.
    found["map_homophones_100_oracle"] = {s: run_metrics(0.30, 0.44 + 0.01 * s) for s in range(3)}
    gains = transfer_map.gains_against_ctc(found, cell)
    assert gains["homophone_points"] == pytest.approx(0.05) and gains["passes"]
    # One paired seed is no evidence.
    assert transfer_map.gains_against_ctc({"map_homophones_100_ctc": {0: run_metrics(0.3)},
                                      "map_homophones_100_oracle": {0: run_metrics(0.1)}}, cell) is None


def test_no_share_of_a_cer_gain_the_oracle_does_not_have():
    oracle = {"relative_cer": 0.0, "relative_cer_ci": (-0.01, 0.01), "passes": True}  # passed on homophones alone
    uot = {"relative_cer": -0.02, "relative_cer_ci": (-0.03, -0.01), "passes": False}
    assert transfer_map._share(uot, oracle) == "–"
    oracle.update(relative_cer=-0.10, relative_cer_ci=(-0.15, -0.05))
    assert transfer_map._share(uot, oracle) == "20%"


def write_run(runs_dir, name, seed, metrics):
    folder = runs_dir / name / f"seed{seed}"
    folder.mkdir(parents=True)
    (folder / "experiment_metrics.json").write_text(json.dumps(metrics))


def test_the_map_runs_the_full_rows_only_where_the_oracle_gains(tmp_path, monkeypatch):
    monkeypatch.setattr(runner, "RUNS_DIR", str(tmp_path))
    monkeypatch.setattr(transfer_map, "TUNE_MAX_STEPS", 300)
    bases = []
    monkeypatch.setattr(runner, "run_base", lambda log, folder, configs: bases.append(folder))
    monkeypatch.setattr(runner, "build_transfer_corpora", lambda log, base_only: None)
    monkeypatch.setattr(transfer_map, "build_data", lambda runner, log, cells: None)
    asked = []
    monkeypatch.setattr(runner, "run_many", lambda rows, seeds, jobs: asked.append(
        ([row.name for row in rows], list(seeds), [row.flags.get("max_steps") for row in rows])))
    write_tune_state(tmp_path, "homophones_100", [(100, 0.4), (200, 0.3), (300, 0.35)])
    write_tune_state(tmp_path, "homophones_400", [(100, 0.4), (200, 0.35), (300, 0.3)])
    for seed in range(3):
        write_run(tmp_path, "map_homophones_100_ctc", seed, run_metrics(0.30, 0.4))
        write_run(tmp_path, "map_homophones_100_oracle", seed, run_metrics(0.25 + 0.001 * seed, 0.4))  # gains
        write_run(tmp_path, "map_homophones_400_ctc", seed, run_metrics(0.30, 0.4))
        write_run(tmp_path, "map_homophones_400_oracle", seed, run_metrics(0.30 + 0.001 * seed, 0.4))  # does not
    transfer_map.run_map(runner, ["homophones_100", "homophones_400", "from_scratch"], jobs=2, log=lambda _: None)
    tune, gate, full = asked
    assert tune == (["map_homophones_100_tune", "map_homophones_400_tune"], [0], [300, 300])
    # The from-scratch cell has no step-count run: stage 1's recipe sets it.
    assert gate[1] == [0, 1, 2] and set(gate[0]) == {
        "map_homophones_100_ctc", "map_homophones_100_oracle", "map_homophones_400_ctc", "map_homophones_400_oracle",
        "map_from_scratch_ctc", "map_from_scratch_oracle"}
    assert dict(zip(gate[0], gate[2]))["map_from_scratch_oracle"] == 6000
    # Each cell's rows at the step count its own validation run chose.
    assert dict(zip(gate[0], gate[2]))["map_homophones_100_oracle"] == 200
    assert dict(zip(gate[0], gate[2]))["map_homophones_400_ctc"] == 300
    assert full == ([f"map_homophones_100_{v}" for v in transfer_map.FULL_ROWS], [0, 1, 2, 3, 4], [200] * 5)
    assert bases == [runner.BASE_DIR]  # the small student's base, once
    # With no cells named, the map is every cell: one command makes all of it.
    assert sorted(transfer_map.DEFAULT_CELLS) == sorted(transfer_map.CELLS)


def test_the_map_leaves_a_cell_whose_step_count_is_not_known_and_decides_no_gate_on_missing_seeds(
        tmp_path, monkeypatch):
    monkeypatch.setattr(runner, "RUNS_DIR", str(tmp_path))
    monkeypatch.setattr(transfer_map, "TUNE_MAX_STEPS", 300)
    monkeypatch.setattr(runner, "run_base", lambda log, folder, configs: None)
    monkeypatch.setattr(runner, "build_transfer_corpora", lambda log, base_only: None)
    monkeypatch.setattr(transfer_map, "build_data", lambda runner, log, cells: None)
    asked = []
    monkeypatch.setattr(runner, "run_many", lambda rows, seeds, jobs: asked.append([row.name for row in rows]))
    # homophones_400's validation run stopped half-way (held by another runner, or failed).
    write_tune_state(tmp_path, "homophones_100", [(100, 0.4), (200, 0.3), (300, 0.35)])
    write_tune_state(tmp_path, "homophones_400", [(100, 0.4), (150, 0.3)])
    # The oracle gains on seeds 0 and 1 by far, but seed 2 is missing: the gate waits for it.
    for seed in range(3):
        write_run(tmp_path, "map_homophones_100_ctc", seed, run_metrics(0.30))
    for seed in range(2):
        write_run(tmp_path, "map_homophones_100_oracle", seed, run_metrics(0.20 + 0.001 * seed))
    lines = []
    transfer_map.run_map(runner, ["homophones_100", "homophones_400"], jobs=1, log=lines.append)
    assert len(asked) == 2  # the validation runs, then the gate: no full rows
    assert asked[1] == ["map_homophones_100_ctc", "map_homophones_100_oracle"]
    assert any("[homophones_400] no step count yet" in line for line in lines)
    assert any("[homophones_100] oracle against CTC alone: not all gate seeds paired yet" in line for line in lines)


def test_runs_of_another_step_count_are_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(runner, "RUNS_DIR", str(tmp_path))
    cell = transfer_map.CELLS["homophones_100"]
    rows = transfer_map.map_rows(runner, cell, 200, transfer_map.GATE_ROWS)
    folder = tmp_path / "map_homophones_100_oracle" / "seed1"
    folder.mkdir(parents=True)
    (folder / "trainer_state.json").write_text(json.dumps({"global_step": 150, "log_history": []}))
    with pytest.raises(SystemExit, match="map_homophones_100_oracle/seed1"):
        transfer_map.refuse_other_step_counts(runner, rows, transfer_map.GATE_SEEDS)
    (folder / "trainer_state.json").write_text(json.dumps({"global_step": 200, "log_history": []}))
    transfer_map.refuse_other_step_counts(runner, rows, transfer_map.GATE_SEEDS)  # the same count: kept


def test_the_report_writes_a_line_per_run_the_map_and_its_plot(tmp_path, monkeypatch):
    monkeypatch.setattr(runner, "RUNS_DIR", str(tmp_path / "runs"))
    monkeypatch.setattr(transfer_map, "TUNE_MAX_STEPS", 300)
    runs = tmp_path / "runs"
    write_tune_state(runs, "homophones_100", [(100, 0.4), (200, 0.3), (300, 0.35)])
    for seed in range(3):
        write_run(runs, "map_homophones_100_ctc", seed, run_metrics(0.30, 0.40))
        write_run(runs, "map_homophones_100_oracle", seed, run_metrics(0.24 + 0.01 * seed, 0.50, plan=0.9))
        write_run(runs, "map_homophones_100_uot_anchor", seed, run_metrics(0.27 + 0.01 * seed, 0.45, plan=0.6))
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "RESULTS.md").write_text("# Results\n\nprose\n")
    transfer_map.write_map_report(runner, str(docs))
    with open(docs / "results" / "map_runs.csv", newline="") as handle:
        records = list(csv.DictReader(handle))
    assert len(records) == 9 and {r["row"] for r in records} == {"ctc", "oracle", "uot_anchor"}
    oracle = [r for r in records if r["row"] == "oracle" and r["seed"] == "2"][0]
    assert (oracle["cell"], oracle["steps"], float(oracle["precision"])) == ("homophones_100", "200", 0.9)
    assert float(oracle["cer"]) == pytest.approx(0.26)
    assert [r["precision"] for r in records if r["row"] == "ctc"] == ["nan"] * 3
    text = (docs / "RESULTS.md").read_text()
    line = [row for row in text.splitlines() if row.startswith("| homophones_100:")][0]
    # Oracle: -0.05 / 0.30 = -16.7 % CER and +10 points; UOT -0.02 / 0.30 = -6.7 %, 40 % of the oracle's gain.
    assert "-16.7 %" in line and "+10.0 pt" in line and "-6.7 %" in line and "| 40% |" in line
    line_400 = [row for row in text.splitlines() if row.startswith("| homophones_400:")][0]
    assert "| not run yet |" in line_400 and "prose" in text
    assert line.count("|") == line_400.count("|") == text.splitlines()[text.splitlines().index(line) - 2].count("|")
    assert "| passes |" in line and "(nan, 0.300, 0.350)" in line  # no step-0 point in this curve
    assert (docs / "results" / "map.png").stat().st_size > 0


def test_set_confusions_count_the_homophones_written_as_another_member_of_their_set(homophone_data, tmp_path,
                                                                                    monkeypatch):
    cell = transfer_map.Cell("small", "four sentences", 4)
    (tmp_path / "corpus" / "test" / "metadata.csv").write_text(
        'file_name,text,homophones\ntest_00.wav,"Turn right, here.",[1]\ntest_01.wav,we see the sea,"[1, 3]"\n')
    description = json.loads((tmp_path / "homophones" / "homophones.json").read_text())
    description["sets"] = [["right", "write", "rite"], ["sea", "see"]]
    (tmp_path / "homophones" / "homophones.json").write_text(json.dumps(description))
    transfer_map.write_cell_corpora(runner, cell)
    run = tmp_path / "run"
    run.mkdir()
    # right -> write (its set), see -> sea (its set), sea -> seat (another word): two of three.
    test_files = "../../../corpus/test/"
    (run / "experiment_predictions.json").write_text(json.dumps(
        {test_files + "test_00.wav": "turn write here", test_files + "test_01.wav": "we sea the seat"}))
    metrics = {"homophones": {"homophone_words": 3}}
    transfer_map.add_set_confusions(runner, cell, str(run), metrics)
    assert metrics["homophones"]["set_confusions"] == 2
    assert metrics["homophones"]["set_confusion_share"] == pytest.approx(2 / 3)
    metrics = {"homophones": {"homophone_words": 4}}  # evaluated on other marks: refused
    with pytest.raises(ValueError, match="homophone words"):
        transfer_map.add_set_confusions(runner, cell, str(run), metrics)
