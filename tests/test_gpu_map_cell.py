"""scripts/gpu_map_cell.py on the CPU with a tiny setting: every stage runs and its figures reach the JSON file."""

import json
import os
import subprocess
import sys

import pytest
import yaml

from script_fixtures import SENTENCES, TINY_MODEL, write_teacher
from test_experiments import write_timed_corpus

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write_homophone_split(root, corpus):
    """A `homophones.json` whose training sentences are the tiny corpus's, first word marked, in reverse order."""
    train, test = SENTENCES[:8], SENTENCES[8:]
    description = {"train": [{"text": t, "positions": [0]} for t in train[::-1]],
                   "test": [{"text": t, "positions": [0]} for t in test]}
    os.makedirs(root)
    with open(os.path.join(root, "homophones.json"), "w") as handle:
        json.dump(description, handle)
    for split in ("train", "test"):  # the column the corpus builder's --homophones writes
        path = os.path.join(corpus, split, "metadata.csv")
        lines = open(path).read().splitlines()
        with open(path, "w") as handle:
            handle.write("\n".join([lines[0] + ",homophones"] + [line + ',"[0]"' for line in lines[1:]]) + "\n")


@pytest.mark.slow
def test_the_gpu_script_runs_every_stage_on_the_cpu_and_writes_its_figures(tmp_path, monkeypatch):
    base_corpus = write_timed_corpus(str(tmp_path / "base_corpus"))
    homophone_corpus = write_timed_corpus(str(tmp_path / "homophone_corpus"), seed=1)
    write_homophone_split(str(tmp_path / "homophones"), homophone_corpus)
    teacher = write_teacher(str(tmp_path / "teacher"))
    student = tmp_path / "student.yaml"
    student.write_text(yaml.safe_dump({"model_config": TINY_MODEL}))
    output = tmp_path / "figures.json"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    command = [
        sys.executable, os.path.join(ROOT, "scripts", "gpu_map_cell.py"), "--output", str(output), "--device", "cpu",
        "--seeds", "0", "1", "--jobs", "2", "--runs-dir", str(tmp_path / "runs"), "--teacher", teacher,
        "--student-config", str(student), "--base-dir", str(tmp_path / "base"), "--base-corpus", base_corpus,
        "--homophone-dir", str(tmp_path / "homophones"), "--homophone-corpus", homophone_corpus,
        "--map-data", str(tmp_path / "map"), "--train-sentences", "6", "--valid-sentences", "2",
        "--base-steps", "4", "--tune-steps", "4", "--eval-steps", "2",
    ]
    result = subprocess.run(command, cwd=str(tmp_path), capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    figures = json.loads(output.read_text())
    assert figures["device"] == "cpu" and figures["skipped"] == []
    assert set(figures["stages"]) == {"base", "steps", "gate"}
    # The base was trained for the tiny step count with the tiny student, then the step count chosen on its curve.
    state = json.loads((tmp_path / "base" / "trainer_state.json").read_text())
    assert state["global_step"] == 4
    assert json.loads((tmp_path / "base" / "plain" / "config.json").read_text())["hidden_size"] == TINY_MODEL[
        "hidden_size"]
    steps = figures["stages"]["steps"]["result"]
    curve = json.loads((tmp_path / "runs" / "map_homophones_100_large_tune" / "seed0" / "trainer_state.json")
                       .read_text())["log_history"]
    cers = {entry["step"]: entry["eval_cer"] for entry in curve if "eval_cer" in entry}
    assert sorted(cers) == [0, 2, 4] and [step for step, _ in steps["curve"]] == [0, 2, 4]
    assert steps["steps"] == min((2, 4), key=lambda step: (cers[step], step))  # lowest CER after the base
    # Two rows on two seeds, each a training of the chosen length from the student's base, and evaluated.
    runs = figures["stages"]["gate"]["result"]["runs"]
    assert sorted((r["row"], r["seed"]) for r in runs) == [
        ("map_homophones_100_large_ctc", 0), ("map_homophones_100_large_ctc", 1),
        ("map_homophones_100_large_oracle", 0), ("map_homophones_100_large_oracle", 1)]
    for run in runs:
        folder = tmp_path / "runs" / run["row"] / f"seed{run['seed']}"
        assert json.loads((folder / "trainer_state.json").read_text())["global_step"] == steps["steps"]
        metrics = json.loads((folder / "experiment_metrics.json").read_text())
        assert (run["cer"], run["homophone_accuracy"]) == (metrics["cer"], metrics["homophones"]["homophone_accuracy"])
        assert metrics["homophones"]["homophone_words"] == 4  # the four test sentences, first word marked
    oracle_config = json.loads((tmp_path / "runs" / "map_homophones_100_large_oracle" / "seed0" / "config.json")
                               .read_text())
    assert oracle_config["aligner"] == "oracle" and oracle_config["teacher_name_or_path"] == teacher


def test_a_spent_budget_skips_the_stages_and_says_so(tmp_path):
    output = tmp_path / "figures.json"
    command = [sys.executable, os.path.join(ROOT, "scripts", "gpu_map_cell.py"), "--output", str(output),
               "--device", "cpu", "--budget-s", "-1"]
    result = subprocess.run(command, cwd=str(tmp_path), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    figures = json.loads(output.read_text())
    assert figures["stages"] == {} and figures["skipped"] == ["base", "steps", "gate"]
