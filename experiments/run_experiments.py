#!/usr/bin/env python
"""The experiments behind docs/RESULTS.md: does UOT transfer help a CTC recogniser, and what does `rho_frames` do?

Every run is one training of `run_speech_recognition_uot.py` (configs/experiments.yaml, then the row's settings)
followed by an evaluation of the saved model on the test split. Runs live in `outputs/experiments/<row>/seed<k>/`;
a finished run is never redone, an interrupted one resumes from its last checkpoint. Pieces run on their own:

    python experiments/run_experiments.py list                           # every row and its command
    python experiments/run_experiments.py run --rows ctc uot_rho1.0      # those rows, seeds 0 1 2
    python experiments/run_experiments.py run --jobs 2                   # everything not yet done, two at a time
    python experiments/run_experiments.py report                         # tables and plots into docs/

The transfer experiments (docs/RESULTS.md, section 1) fine-tune a base model trained once (stage 1) on a shifted
target set (stage 2), every variant first on a validation split, then the table's rows on five seeds:

    python experiments/run_experiments.py base                           # corpora and the stage-1 model
    python experiments/run_experiments.py run --regimes target-tune target --jobs 2
    python experiments/run_experiments.py transfer-report                # section 1's tables
    python experiments/run_experiments.py lm                             # greedy and n-gram decoding of two rows
    python experiments/run_experiments.py lm-report                      # their table

The transfer map (docs/RESULTS.md, "Where the transfer pays"; experiments/transfer_map.py):

    python experiments/run_experiments.py map --jobs 2                   # the default cells, resumable
    python experiments/run_experiments.py map-report                     # its table, plot and CSV

Runs use one CPU thread each (`OMP_NUM_THREADS=1`), which makes a seed's numbers repeatable on the same machine and
software. The evaluation adds what the training script does not measure: WER and CER for voices heard in
training and voices never heard, the precision and recall of the transport plan against the corpus's word timings,
and the degree-of-matching curve (dropped frames, effective frames, mass outside words, precision and recall) over
a grid of `rho_frames` and two `eps` on each trained model's own costs.

To check that a run repeats, train it again into another folder and compare the two `experiment_metrics.json`:

    python experiments/run_experiments.py --runs-dir outputs/rerun run --rows ctc --seeds 0
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import shlex
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Optional

from tqdm.auto import tqdm

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # the package, from a checkout that is not installed

from modeling_uot_ctc.data import SAMPLING_RATE, frame_timing  # noqa: E402

BASE_CONFIG = "configs/experiments.yaml"
RUNS_DIR = "outputs/experiments"
CLEAN_CORPUS = "data/demo_corpus"
PADDED_CORPUS = "data/demo_corpus_padded"
LOW_RESOURCE_SAMPLES = 600
DEFAULT_SEEDS = (0, 1, 2)
# The transfer experiments: a CTC base model trained once on BASE_CORPUS (stage 1), fine-tuned on TARGET_CORPUS,
# accents and voices the base never heard with silence or noise around each utterance (stage 2), row by row.
BASE_CORPUS = "data/transfer_base"
TARGET_CLEAN_CORPUS = "data/transfer_target_clean"
TARGET_CORPUS = "data/transfer_target"
BASE_CONFIGS = (BASE_CONFIG, "configs/transfer_base.yaml")
BASE_DIR = "outputs/transfer/base"
TARGET_CONFIGS = (BASE_CONFIG, "configs/transfer_finetune.yaml")
TARGET_SEEDS = (0, 1, 2, 3, 4)
# Settings are chosen on a validation split of the target's training set: TUNE_VALID of its utterances (drawn with
# `random.Random(0)`) are held out and the rest trained on.
TUNE_CORPUS = "data/transfer_target_tune"
TUNE_VALID = 100
TUNE_SEEDS = (0,)
BASE_THREADS = 2
# The corpora, each from the one before (same seed, disjoint sentences: the target skips what the base took).
CORPUS_COMMANDS = {
    BASE_CORPUS: "python -m modeling_uot_ctc.corpus --output data/transfer_base --utterances 8000 "
    "--test-fraction 0.05 --voices base --seed 0",
    TARGET_CLEAN_CORPUS: "python -m modeling_uot_ctc.corpus --output data/transfer_target_clean --utterances 600 "
    "--test-fraction 0.3333333 --voices target --skip-sentences 8000 --seed 0",
    TARGET_CORPUS: "python -m modeling_uot_ctc.corpus --pad-from data/transfer_target_clean --output "
    "data/transfer_target --seed 0",
}
# The grid of the degree-of-matching curve; inf is balanced transport (every frame keeps its share).
RHO_GRID = (0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0, math.inf)
# The curve at the recipe's entropic regularisation and at a sharper one, where frames can separate more.
SWEEP_EPS = (0.1, 0.02)
SCORES = ("dropped", "mass", "precision", "recall", "effective_frames", "mass_outside_words")
# Flags added to every training this module launches (the base's and the rows'), after the row's own: a GPU run's
# `use_cpu false`, a teacher folder of another machine (scripts/gpu_map_cell.py sets them).
EXTRA_TRAIN_FLAGS: dict = {}
# Bump when the evaluation changes: the report refuses metrics of another version (rerun with --reevaluate).
EVAL_VERSION = 2


@dataclass(frozen=True)
class Row:
    """One line of the results table: a regime (which data) and the transfer settings, as script flags."""

    name: str
    regime: str
    description: str
    flags: dict = field(default_factory=dict)
    # The map's rows (experiments/transfer_map.py) name their own corpus, config files and rerun command.
    corpus: Optional[str] = None
    configs: Optional[tuple] = None
    rerun: Optional[str] = None

    @property
    def data_dir(self) -> str:
        if self.corpus:
            return self.corpus
        return {"padded": PADDED_CORPUS, "target": TARGET_CORPUS, "target-tune": TUNE_CORPUS}.get(
            self.regime, CLEAN_CORPUS
        )

    @property
    def seeds(self) -> tuple:
        """The seeds the table reports for this row."""
        return {"target": TARGET_SEEDS, "target-tune": TUNE_SEEDS}.get(self.regime, DEFAULT_SEEDS)

    @property
    def command(self) -> str:
        """The command that trains and evaluates every default seed of the row (printed beside it in the table)."""
        if self.rerun:
            return self.rerun
        return f"python experiments/run_experiments.py run --rows {self.name} --seeds {' '.join(map(str, self.seeds))}"

    def train_argv(self, seed: int) -> list[str]:
        """The training script's arguments for this row and seed."""
        flags = {"data_dir": self.data_dir, **self.flags, "seed": seed, "output_dir": run_dir(self, seed)}
        if self.regime == "low-resource":
            flags["max_train_samples"] = LOW_RESOURCE_SAMPLES
        flags.update(EXTRA_TRAIN_FLAGS)
        if self.configs:
            argv = list(self.configs)
        else:
            argv = list(TARGET_CONFIGS) if self.regime.startswith("target") else [BASE_CONFIG]
        for key, value in flags.items():
            argv += [f"--{key}", str(value)]
        return argv


# The anchored transfer of the stage-2 rows: the CTC head's posteriors in the cost, eps 0.05, rho_frames 0.1 and the
# temporal prior, the setting the frozen-encoder probes found to follow the speech (docs/RESULTS.md).
ANCHORED = {
    "aligner": "uot", "alignment_anchor_weight": 1.0, "alignment_eps": 0.05, "rho_frames": 0.1,
    "temporal_order_weight": 1.0,
}


# The stage-2 variants: `(description, flags)`.
VARIANTS = {
    "ctc": ("CTC only (no teacher)", {"aligner": "none"}),
    "oracle": ("oracle: each token pooled from its word's frames", {"aligner": "oracle"}),
    "diagonal": ("diagonal plan (equal consecutive runs)", {"aligner": "diagonal"}),
    "uot_cosine": ("UOT, cosine cost (the from-scratch recipe)", {"aligner": "uot", "rho_frames": 1.0}),
    "uot_cosine_fixed": (
        "UOT, cosine cost, centred teacher, eps per spread, temporal prior",
        {"aligner": "uot", "rho_frames": 1.0, "teacher_centering": "utterance", "alignment_cost_scale": "std",
         "temporal_order_weight": 1.0},
    ),
    "uot_anchor": ("UOT, anchored cost + temporal prior", ANCHORED),
    "uot_anchor_rho1": ("UOT, anchored, rho_frames 1", {**ANCHORED, "rho_frames": 1.0}),
    "uot_anchor_sharp": (
        "UOT, anchored, eps 0.02, rho_frames 0.03", {**ANCHORED, "alignment_eps": 0.02, "rho_frames": 0.03}
    ),
    "uot_anchor_blend": ("UOT, half anchor half cosine", {**ANCHORED, "alignment_anchor_weight": 0.5}),
    "uot_anchor_noprior": ("UOT, anchored, no temporal prior", {**ANCHORED, "temporal_order_weight": 0.0}),
    "uot_anchor_infonce": ("UOT, anchored, + contrastive loss", {**ANCHORED, "kt_loss_type": "cosine+infonce"}),
    "uot_anchor_ramp": (
        "UOT, anchored, warm-up 50 and ramp 100 steps", {**ANCHORED, "kt_warmup_steps": 50, "kt_ramp_steps": 100}
    ),
    "ot_anchor": ("balanced OT, anchored cost + temporal prior", {**ANCHORED, "aligner": "ot"}),
    # How much weight the transfer needs to move the recogniser at all: the oracle bound and the anchored UOT.
    "oracle_kt2": ("oracle, kt_weight 2", {"aligner": "oracle", "kt_weight": 2.0}),
    "oracle_kt8": ("oracle, kt_weight 8", {"aligner": "oracle", "kt_weight": 8.0}),
    "oracle_infonce": ("oracle, + contrastive loss", {"aligner": "oracle", "kt_loss_type": "cosine+infonce"}),
    "uot_anchor_kt2": ("UOT, anchored, kt_weight 2", {**ANCHORED, "kt_weight": 2.0}),
    "uot_anchor_kt8": ("UOT, anchored, kt_weight 8", {**ANCHORED, "kt_weight": 8.0}),
    # A more lexical teacher layer (MiniLM's first), easier to predict from sound, at the chosen weight.
    "oracle_layer1": ("oracle, teacher layer 1, kt_weight 2", {"aligner": "oracle", "kt_weight": 2.0,
                                                               "teacher_layer": 1}),
    "uot_anchor_layer1": ("UOT, anchored, teacher layer 1, kt_weight 2", {**ANCHORED, "kt_weight": 2.0,
                                                                          "teacher_layer": 1}),
}
TABLE_VARIANTS = ("ctc", "oracle", "diagonal", "uot_cosine", "uot_anchor")
# The transfer's weight in the table's rows, chosen on the validation split (tune_*_kt2 against tune_*: the oracle and
# the anchored UOT both did best at 2, of 0.5, 2 and 8).
TABLE_KT_WEIGHT = 2.0


def _table_flags(flags: dict) -> dict:
    return flags if flags["aligner"] == "none" else {**flags, "kt_weight": TABLE_KT_WEIGHT}


def _rows() -> list[Row]:
    # In the order `run` works through them: the clean ablation, the padded regime, the low-resource regime's main
    # contrast, the kt_weight sweep, then the low-resource regime's balanced-OT row.
    uot = lambda rho, **extra: {"aligner": "uot", "rho_frames": rho, **extra}  # noqa: E731
    return [
        Row("ctc", "clean", "CTC only (no teacher)", {"aligner": "none"}),
        Row("ot", "clean", "balanced OT transfer", {"aligner": "ot"}),
        Row("tot", "clean", "balanced OT + temporal-order prior", {"aligner": "ot", "temporal_order_weight": 1.0}),
        Row("uot_rho0.1", "clean", "UOT transfer, rho_frames 0.1", uot(0.1)),
        Row("uot_rho1.0", "clean", "UOT transfer, rho_frames 1", uot(1.0)),
        Row("uot_rho10.0", "clean", "UOT transfer, rho_frames 10", uot(10.0)),
        Row("padded_ctc", "padded", "CTC only (no teacher)", {"aligner": "none"}),
        Row("padded_ot", "padded", "balanced OT transfer", {"aligner": "ot"}),
        Row("padded_uot_rho1.0", "padded", "UOT transfer, rho_frames 1", uot(1.0)),
        Row("padded_uot_rho0.1", "padded", "UOT transfer, rho_frames 0.1", uot(0.1)),
        Row("low_ctc", "low-resource", "CTC only (no teacher)", {"aligner": "none"}),
        Row("low_uot_rho1.0", "low-resource", "UOT transfer, rho_frames 1", uot(1.0)),
        Row("uot_rho1.0_kt0.1", "clean", "UOT, rho_frames 1, kt_weight 0.1", uot(1.0, kt_weight=0.1)),
        Row("uot_rho1.0_kt2.0", "clean", "UOT, rho_frames 1, kt_weight 2", uot(1.0, kt_weight=2.0)),
        Row("low_ot", "low-resource", "balanced OT transfer", {"aligner": "ot"}),
        # Section 1's anchored transfer from scratch: the anchor reads the CTC head, so CTC trains alone first.
        Row("uot_anchor_warm", "clean", "UOT, anchored cost + prior after 400 steps of CTC alone, kt_weight 2",
            {**ANCHORED, "kt_warmup_steps": 400, "kt_weight": 2.0}),
        # Stage 2 of the transfer experiments: the base model fine-tuned on the target set. Every variant is first
        # run on the validation split of the target's training set ("tune_", one seed), where the defaults were
        # chosen; the table's rows ("target_", five seeds) are the controls and the chosen settings.
        *[Row(f"tune_{name}", "target-tune", description, flags) for name, (description, flags) in VARIANTS.items()],
        *[
            Row(f"target_{name}", "target", f"{VARIANTS[name][0]}, kt_weight {TABLE_KT_WEIGHT:g}"
                if name != "ctc" else VARIANTS[name][0], _table_flags(VARIANTS[name][1]))
            for name in TABLE_VARIANTS
        ],
    ]


ROWS = {row.name: row for row in _rows()}


def run_dir(row: Row, seed: int) -> str:
    """Where one run's model, logs and metrics live."""
    return os.path.join(RUNS_DIR, row.name, f"seed{seed}")


def train_command(row: Row, seed: int) -> str:
    """The shell command that trains one run, as printed in its log."""
    argv = ["OMP_NUM_THREADS=1", "python", "run_speech_recognition_uot.py", *row.train_argv(seed)]
    return " ".join(shlex.quote(a) if "=" not in a else a for a in argv)


# ------------------------------------------------------------------------------------------------------ running


def run_one(row: Row, seed: int, log=print, reevaluate: bool = False) -> dict:
    """Train (or resume) and evaluate one run; return its metrics. A finished run is read back, not redone, unless
    `reevaluate` asks for its evaluation again (after a change to the evaluation; the training is kept)."""
    folder = run_dir(row, seed)
    metrics_path = os.path.join(folder, "experiment_metrics.json")
    if os.path.isfile(metrics_path) and not reevaluate:
        with open(metrics_path, encoding="utf-8") as handle:
            return json.load(handle)
    os.makedirs(folder, exist_ok=True)
    lock = os.path.join(folder, "running.pid")
    if _held_by_another_process(lock):
        log(f"[{row.name} seed {seed}] skipped: another runner is working on it ({lock})")
        return None
    with open(lock, "w", encoding="utf-8") as handle:
        handle.write(str(os.getpid()))
    try:
        return _train_and_evaluate(row, seed, folder, metrics_path, log)
    finally:
        os.remove(lock)


def _held_by_another_process(lock: str) -> bool:
    """Whether `lock` names a live process other than this one (a lock left by a killed runner does not count)."""
    try:
        with open(lock, encoding="utf-8") as handle:
            pid = int(handle.read().strip())
    except (OSError, ValueError):
        return False
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _train_and_evaluate(row: Row, seed: int, folder: str, metrics_path: str, log) -> dict:
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
        "TQDM_MININTERVAL": "30",
    }
    started = time.time()
    if not os.path.isfile(os.path.join(folder, "train_results.json")):
        if any(name.startswith("checkpoint-") for name in os.listdir(folder)):
            open(os.path.join(folder, "resumed"), "w").close()  # the script resumes from the checkpoint
        log(f"[{row.name} seed {seed}] training: {train_command(row, seed)}")
        with open(os.path.join(folder, "train.log"), "a", encoding="utf-8") as handle:
            subprocess.run(
                [sys.executable, "run_speech_recognition_uot.py", *row.train_argv(seed)],
                cwd=ROOT,
                env=env,
                stdout=handle,
                stderr=subprocess.STDOUT,
                check=True,
            )
    log(f"[{row.name} seed {seed}] evaluating")
    with open(os.path.join(folder, "evaluate.log"), "a", encoding="utf-8") as handle:
        subprocess.run(
            [sys.executable, __file__, "evaluate", folder, "--data_dir", row.data_dir],
            cwd=ROOT,
            env=env,
            stdout=handle,
            stderr=subprocess.STDOUT,
            check=True,
        )
    with open(metrics_path, encoding="utf-8") as handle:
        metrics = json.load(handle)
    log(f"[{row.name} seed {seed}] done in {(time.time() - started) / 60:.1f} min: WER {metrics['wer']:.3f}")
    return metrics


def build_transfer_corpora(log=print, base_only: bool = False) -> None:
    """Build whichever corpus of the transfer experiments is missing (each command is in `CORPUS_COMMANDS`), then
    the validation split (`write_tuning_split`); with `base_only`, the base corpus alone."""
    for folder, command in CORPUS_COMMANDS.items():
        if os.path.isfile(os.path.join(folder, "test", "metadata.csv")) or (base_only and folder != BASE_CORPUS):
            continue
        log(f"building {folder}: {command}")
        subprocess.run([sys.executable, *shlex.split(command)[1:]], cwd=ROOT, check=True)
    if base_only:
        return
    if not os.path.isfile(os.path.join(TUNE_CORPUS, "test", "metadata.csv")):
        write_tuning_split(TARGET_CORPUS, TUNE_CORPUS, TUNE_VALID)


def write_tuning_split(source: str, output: str, n_valid: int, seed: int = 0) -> None:
    """An audiofolder whose `test` split is `n_valid` utterances of `source`'s training split and whose `train` split
    is the rest: manifests only, pointing at `source`'s files by relative paths."""
    import random

    with open(os.path.join(source, "train", "metadata.csv"), newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    random.Random(seed).shuffle(rows)
    write_manifest(rows[:n_valid], os.path.join(source, "train"), os.path.join(output, "test"))
    write_manifest(rows[n_valid:], os.path.join(source, "train"), os.path.join(output, "train"))


def write_manifest(rows: list[dict], source_split: str, output_split: str) -> None:
    """Write `rows` (a corpus's metadata rows, from the folder `source_split`) as the split folder `output_split`: a
    `metadata.csv` whose `file_name`s point at the source's files by relative paths, sorted by file name. No audio
    is copied, so a corpus can be cut into many splits for free."""
    os.makedirs(output_split, exist_ok=True)
    relative = os.path.relpath(source_split, output_split)
    chosen = sorted(rows, key=lambda row: row["file_name"])
    with open(os.path.join(output_split, "metadata.csv"), "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(chosen[0]))
        writer.writeheader()
        writer.writerows({**row, "file_name": os.path.join(relative, row["file_name"])} for row in chosen)


def base_argv(folder: str = BASE_DIR, configs: tuple = BASE_CONFIGS) -> list[str]:
    """The training script's arguments for a stage-1 base model in `folder` (resumes from its last checkpoint)."""
    flags = {"output_dir": folder, "plain_model_dir": os.path.join(folder, "plain"), **EXTRA_TRAIN_FLAGS}
    return [*configs, *[part for key, value in flags.items() for part in (f"--{key}", str(value))]]


def run_base(log=print, folder: str = BASE_DIR, configs: tuple = BASE_CONFIGS, all_corpora: bool = True) -> dict:
    """Stage 1: train the CTC base model on BASE_CORPUS (or resume it), export it as a plain checkpoint for the
    stage-2 rows, and evaluate it on the base corpus's test split (held-out sentences, voices heard in training).
    A finished base is read back, not redone.

    Args:
        log: where progress lines go.
        folder: the base's output folder; its plain export goes to `<folder>/plain`.
        configs: the training script's config files (another student: BASE_CONFIGS and its model's file).
        all_corpora: build every missing corpus of the transfer experiments first, not only the base's.
    """
    build_transfer_corpora(log, base_only=not all_corpora)
    metrics_path = os.path.join(folder, "experiment_metrics.json")
    if os.path.isfile(metrics_path):
        with open(metrics_path, encoding="utf-8") as handle:
            return json.load(handle)
    os.makedirs(folder, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(BASE_THREADS), "MKL_NUM_THREADS": str(BASE_THREADS),
           "HF_HUB_OFFLINE": "1", "TQDM_MININTERVAL": "30"}
    if not os.path.isfile(os.path.join(folder, "plain", "model.safetensors")):
        argv = base_argv(folder, configs)
        log(f"[base {folder}] training: OMP_NUM_THREADS={BASE_THREADS} python run_speech_recognition_uot.py "
            + " ".join(map(shlex.quote, argv)))
        with open(os.path.join(folder, "train.log"), "a", encoding="utf-8") as handle:
            subprocess.run([sys.executable, "run_speech_recognition_uot.py", *argv], cwd=ROOT, env=env,
                           stdout=handle, stderr=subprocess.STDOUT, check=True)
    log(f"[base {folder}] evaluating")
    metrics = evaluate_run(folder, BASE_CORPUS)
    log(f"[base {folder}] CER {metrics['cer']:.3f}, WER {metrics['wer']:.3f} on {metrics['test_utterances']} test "
        "utterances")
    return metrics


def run_many(rows: list[Row], seeds, jobs: int, reevaluate: bool = False) -> None:
    """Run every (row, seed) not yet done, `jobs` at a time; list the failures at the end."""
    # Seed by seed, every row of a seed before the next seed: paired comparisons grow as runs finish, which is what
    # an interrupted long batch (the map's from-scratch cell) leaves to read.
    pending = [(row, seed) for seed in seeds for row in rows]
    todo = [(r, s) for r, s in pending if not os.path.isfile(os.path.join(run_dir(r, s), "experiment_metrics.json"))]
    if reevaluate:
        todo = pending
    done = len(pending) - len(todo) if not reevaluate else 0
    print(f"{len(pending)} runs asked for, {done} done, {len(todo)} to run or to evaluate again, {jobs} at a time")
    if not todo:
        return
    failures = []

    def attempt(item):
        row, seed = item
        try:
            run_one(row, seed, reevaluate=reevaluate)
        except Exception as error:  # one failed run must not stop the others
            stage = (
                "evaluation" if os.path.isfile(os.path.join(run_dir(row, seed), "train_results.json")) else "training"
            )
            failures.append(f"{row.name} seed {seed}: {stage} failed ({error}); see {run_dir(row, seed)}/train.log")
            print(f"[{row.name} seed {seed}] FAILED: {failures[-1]}", flush=True)

    with ThreadPoolExecutor(max_workers=jobs) as pool:
        list(pool.map(attempt, todo))
    if failures:
        raise SystemExit("Some runs failed:\n  " + "\n  ".join(failures))


# --------------------------------------------------------------------------------------------------- evaluation


def word_reference(n_frames: int, words: list, hop: float, first_centre: float):
    """For each frame, the index of the word whose timing `[start, end)` holds the frame's centre, or -1 (leading
    silence, added padding). `words` is the corpus's `[[word, start_s, end_s], ...]`."""
    import torch

    reference = torch.full((n_frames,), -1, dtype=torch.long)
    centres = first_centre + torch.arange(n_frames, dtype=torch.float64) * hop
    for index, (_, start, end) in enumerate(words):
        reference[(centres >= start) & (centres < end)] = index
    return reference


def token_words(tokenizer, text: str) -> list[int]:
    """The whitespace-word index of each word piece of `text` (special tokens left out, as the teacher does)."""
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True, truncation=True, max_length=512)
    word_starts = [i for i, c in enumerate(text) if c != " " and (i == 0 or text[i - 1] == " ")]
    result = []
    for start, _ in encoded["offset_mapping"]:
        result.append(sum(1 for s in word_starts if s <= start) - 1)
    return result


def evaluate_run(folder: str, data_dir: str, batch_size: int = 1, teacher_cache_dir: Optional[str] = None) -> dict:
    """Transcribe the test split with the saved model and measure it; writes `experiment_metrics.json`.

    Args:
        folder: a run's output folder (the saved model and processor).
        data_dir: the corpus it was trained on (audiofolder layout with word timings and `seen_voice`).
        batch_size: utterances per forward pass. Keep 1 for models with a group-norm front end
            (`feat_extract_norm="group"`, as in configs/experiments.yaml): it normalises over the padded input, so
            padding would change the other utterances' frames, and the pipeline transcribes one file at a time.
        teacher_cache_dir: the teacher-state cache (default: the training script's default).
    """
    import evaluate
    import numpy as np
    import torch
    import yaml
    from transformers import Wav2Vec2Processor

    from modeling_uot_ctc import ALIGNERS, Wav2Vec2ForCTCWithUOT
    from modeling_uot_ctc.data import decode_audio, normalise_text, token_characters, token_frame_spans
    from modeling_uot_ctc.diagnostics import frame_fit_spread
    from modeling_uot_ctc.transfer import alignment_cost, centred_states
    from modeling_uot_ctc.metrics import METRIC_PATHS
    from modeling_uot_ctc.teacher import TeacherStateCache, TextTeacher
    from modeling_uot_ctc.word_pieces import anchor_units

    # Transcripts are normalised as the experiments' training normalised them.
    with open(os.path.join(ROOT, BASE_CONFIG), encoding="utf-8") as handle:
        chars_to_ignore = yaml.safe_load(handle).get("chars_to_ignore")
    processor = Wav2Vec2Processor.from_pretrained(folder)
    vocab, units_of = processor.tokenizer.get_vocab(), anchor_units(processor.tokenizer)
    model = Wav2Vec2ForCTCWithUOT.from_pretrained(folder).eval()
    config = model.config
    hop, first_centre = frame_timing(config)
    aligned = config.aligner != "none"
    teacher = cache = None
    if aligned:
        teacher = TextTeacher(config.teacher_name_or_path, layer=config.teacher_layer)
        cache = TeacherStateCache(teacher, teacher_cache_dir)

    with open(os.path.join(data_dir, "test", "metadata.csv"), newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    for row in rows:
        row["normalised"] = normalise_text(row["text"], chars_to_ignore, True)
        row["audio"] = decode_audio(os.path.join(data_dir, "test", row["file_name"]), True, row["file_name"])
    rows.sort(key=lambda r: len(r["audio"]))

    predictions = {}
    sweep_eps = sorted({config.alignment_eps, *SWEEP_EPS}, reverse=True)
    sweep = {(eps, rho): {k: [] for k in SCORES} for eps in sweep_eps for rho in RHO_GRID}
    trained, diagonal, prior = {k: [] for k in SCORES}, {k: [] for k in SCORES}, {k: [] for k in SCORES}
    spreads = []
    # The model's own diagnostics of each utterance's plan (`Wav2Vec2UOTOutput`), NaN-free values only.
    instruments = {k: [] for k in ("token_discrimination", "frames_per_token", "padding_mass", "cost_spread_over_eps")}
    chance = []
    costs = []  # (cost, reference) of each scored utterance, for the sweep
    for start in tqdm(range(0, len(rows), batch_size), desc=f"evaluating {folder}", mininterval=30):
        chunk = rows[start : start + batch_size]
        batch = processor.feature_extractor(
            [r["audio"] for r in chunk], sampling_rate=SAMPLING_RATE, padding=True, return_tensors="pt"
        )
        teacher_inputs = {}
        if aligned:
            states = cache([r["normalised"] for r in chunk])
            n_tokens = states.hidden_states.shape[1]
            texts = [r["normalised"] for r in chunk]
            words = [json.loads(r["words"]) if r.get("words") else None for r in chunk]
            teacher_inputs = dict(
                teacher_hidden_states=states.hidden_states, teacher_attention_mask=states.attention_mask,
                teacher_token_characters=token_characters(states.tokens, vocab, n_tokens, units_of),
                token_frame_spans=token_frame_spans(texts, states.tokens, words, hop, first_centre, n_tokens),
            )
        with torch.no_grad():
            outputs = model(
                batch.input_values,
                attention_mask=batch.attention_mask,
                output_hidden_states=aligned,
                output_alignments=True,
                **teacher_inputs,
            )
        # Each utterance decoded over its own frames only: padding frames of a batch may emit characters.
        lengths = model._get_feat_extract_output_lengths(batch.attention_mask.sum(-1))
        for row, ids, length in zip(chunk, outputs.logits.argmax(-1), lengths):
            predictions[row["file_name"]] = processor.decode(ids[: int(length)])
        if not aligned:
            continue
        # (Batches of one utterance: the model's batch means are that utterance's values. An utterance the oracle
        # could not time has no plan, and its values are NaN.)
        for name, values in instruments.items():
            value = float(getattr(outputs, name))
            if not math.isnan(value):
                values.append(value)
        if not math.isnan(float(outputs.token_discrimination)):
            chance.append(1.0 / float(states.attention_mask.sum()))

        # The plan the model trains with, a no-information plan, and the model's costs solved over the grid.
        frame_mask = model._get_feature_vector_attention_mask(outputs.logits.shape[1], batch.attention_mask).bool()
        token_mask = states.attention_mask.bool()
        with torch.no_grad():
            acoustic = outputs.hidden_states[config.kt_encoder_layer]
            frames = model.kt_adapter(acoustic)
            teacher_states = torch.where(token_mask[:, :, None], states.hidden_states.to(frames.dtype), 0.0)
            if config.teacher_centering == "utterance":
                teacher_states = centred_states(teacher_states, token_mask)
            # The cost the model solves in training (anchor and scale included), for the sweep below.
            cost = alignment_cost(
                frames, teacher_states, frame_mask, token_mask, anchor_weight=config.alignment_anchor_weight,
                cost_scale=config.alignment_cost_scale, log_probs=outputs.logits.log_softmax(-1),
                token_characters=teacher_inputs["teacher_token_characters"],
            )
            # The temporal-order plan: the prior alone, on a cost that says nothing, balanced.
            prior_plan = ALIGNERS["uot"](
                torch.zeros_like(cost), frame_mask, token_mask, eps=config.alignment_eps, rho_frames=math.inf,
                temporal_order_weight=1.0, max_iter=config.alignment_max_iter, tol=config.alignment_tol,
            ).plan
        references = word_alignment_references(chunk, teacher.tokenizer, token_mask, frame_mask, hop, first_centre)
        if outputs.alignments is not None:
            score_plans(trained, outputs.alignments, references, frame_mask)
        score_plans(diagonal, diagonal_plans(frame_mask, token_mask), references, frame_mask)
        score_plans(prior, prior_plan, references, frame_mask)
        spreads += [v for v in frame_fit_spread(cost, frame_mask, token_mask, config.alignment_eps).tolist()
                    if not math.isnan(v)]
        for index, reference in enumerate(references):
            if reference is not None:
                n_frames, n_tokens = int(frame_mask[index].sum()), int(token_mask[index].sum())
                pieces_to_words, frame_words = reference
                costs.append((cost[index, :n_frames, :n_tokens], (pieces_to_words[:n_tokens], frame_words[:n_frames])))

    # The sweep, solved in padded batches (the utterances are in length order): one solve per (eps, rho) and batch.
    for first in range(0, len(costs), 32):
        group = costs[first : first + 32]
        shape = (len(group), max(c.shape[0] for c, _ in group), max(c.shape[1] for c, _ in group))
        cost = torch.zeros(shape)
        frame_mask, token_mask = torch.zeros(shape[:2], dtype=torch.bool), torch.zeros(shape[::2], dtype=torch.bool)
        for index, (one, _) in enumerate(group):
            cost[index, : one.shape[0], : one.shape[1]] = one
            frame_mask[index, : one.shape[0]], token_mask[index, : one.shape[1]] = True, True
        for eps, rho in sweep:
            settings = {**config.solver_settings, "eps": eps, "rho_frames": rho}
            result = ALIGNERS["uot"](cost, frame_mask, token_mask, **settings)
            for index, (one, reference) in enumerate(group):
                n_frames, n_tokens = one.shape
                score_plans(
                    sweep[eps, rho],
                    result.plan[index : index + 1, :n_frames, :n_tokens],
                    [reference],
                    frame_mask[index : index + 1, :n_frames],
                    converged=result.converged[index : index + 1],
                )

    wer, cer = evaluate.load(METRIC_PATHS["wer"]), evaluate.load(METRIC_PATHS["cer"])
    metrics = {"eval_version": EVAL_VERSION, "test_utterances": len(rows), "aligner": config.aligner}
    for subset, keep in (
        ("", lambda r: True),
        ("_seen", lambda r: r["seen_voice"] == "True"),
        ("_unseen", lambda r: r["seen_voice"] != "True"),
    ):
        chosen = [r for r in rows if keep(r)]
        if not chosen:
            continue
        hyps, refs = [predictions[r["file_name"]] for r in chosen], [r["normalised"] for r in chosen]
        metrics[f"wer{subset}"] = wer.compute(predictions=hyps, references=refs)
        metrics[f"cer{subset}"] = cer.compute(predictions=hyps, references=refs)
        metrics[f"utterances{subset}"] = len(chosen)
    if rows and "homophones" in rows[0]:  # a homophone corpus (`python -m modeling_uot_ctc.homophones`)
        from modeling_uot_ctc.homophone_accuracy import homophone_accuracy

        metrics["homophones"] = homophone_accuracy(
            [r["normalised"] for r in rows], [predictions[r["file_name"]] for r in rows],
            [json.loads(r["homophones"]) for r in rows],
        )
    if aligned:
        mean = lambda values: float(np.nanmean(values)) if values else float("nan")  # noqa: E731
        metrics["alignment_scored_utterances"] = len(trained["precision"])
        metrics["alignment"] = {k: mean(v) for k, v in trained.items() if v}
        metrics["alignment_diagonal"] = {k: mean(v) for k, v in diagonal.items() if v}
        metrics["alignment_temporal_prior"] = {k: mean(v) for k, v in prior.items() if v}
        metrics["frame_fit_spread_over_eps"] = mean(spreads)
        metrics["instruments"] = {k: mean(v) for k, v in instruments.items() if v}
        metrics["instruments"]["discrimination_chance"] = mean(chance)
        metrics["rho_sweep"] = [
            {"eps": eps, "rho_frames": None if math.isinf(rho) else rho, **{k: mean(v) for k, v in values.items()}}
            for (eps, rho), values in sweep.items()
        ]
    state_path = os.path.join(folder, "trainer_state.json")
    if os.path.isfile(state_path):
        with open(state_path, encoding="utf-8") as handle:
            history = json.load(handle)["log_history"]
        final = [h for h in history if "train_runtime" in h]
        metrics["train_minutes"] = final[-1]["train_runtime"] / 60 if final else None
        logged = [h for h in history if "dropped_frame_fraction" in h]
        if logged:
            metrics["train_log_last"] = {k: logged[-1][k] for k in ("dropped_frame_fraction", "transported_mass")}
    with open(os.path.join(folder, "experiment_predictions.json"), "w", encoding="utf-8") as handle:
        json.dump(dict(sorted(predictions.items())), handle, indent=0)
    # Written last: its presence marks the run as done.
    with open(os.path.join(folder, "experiment_metrics.json"), "w", encoding="utf-8") as handle:
        json.dump(metrics, handle, indent=2)
    return metrics


def diagonal_plans(frame_mask, token_mask):
    """The no-information baseline: the valid frames cut into equal consecutive runs, one per word piece, in order."""
    import torch

    batch, n_frames = frame_mask.shape
    plans = torch.zeros(batch, n_frames, token_mask.shape[1])
    for index in range(batch):
        t, n = int(frame_mask[index].sum()), int(token_mask[index].sum())
        if t and n:
            pieces = torch.arange(t) * n // t
            plans[index, torch.arange(t), pieces] = 1.0 / t
    return plans


def word_alignment_references(chunk, tokenizer, token_mask, frame_mask, hop: float, first_centre: float) -> list:
    """Per utterance of a batch: `(pieces_to_words, frame_reference)`, a `(N, W)` 0/1 matrix grouping the teacher's
    word pieces into whitespace words and the `(T,)` word index of each frame (see `word_reference`); `None` where
    the two cannot be lined up."""
    import torch

    references = []
    for index, row in enumerate(chunk):
        words = json.loads(row["words"])
        n_tokens = int(token_mask[index].sum())
        piece_words = token_words(tokenizer, row["normalised"])
        # Skipped (and so not counted in `alignment_scored_utterances`): an utterance whose normalisation changed its
        # word count (a word of punctuation only), or whose transcript the teacher truncated.
        if len(row["normalised"].split()) != len(words) or len(piece_words) != n_tokens:
            references.append(None)
            continue
        pieces_to_words = torch.zeros(token_mask.shape[1], len(words))
        pieces_to_words[torch.arange(n_tokens), torch.tensor(piece_words)] = 1.0
        references.append((pieces_to_words, word_reference(frame_mask.shape[1], words, hop, first_centre)))
    return references


def score_plans(store: dict, plans, references: list, frame_mask, converged=None) -> None:
    """Append each plan's word-level scores to the lists in `store` (keys: `SCORES`, and `converged` when given).

    The plan's word-piece columns are summed per word; `alignment_diagnostics` then gives the dropped-frame
    fraction, the mass, and precision and recall against the word timings."""
    from modeling_uot_ctc import alignment_diagnostics

    for index, reference in enumerate(references):
        if reference is None:
            continue
        pieces_to_words, frame_words = reference
        word_plan = plans[index].float() @ pieces_to_words  # (T, W)
        stats = alignment_diagnostics(word_plan[None], frame_mask[index][None], reference=frame_words[None])
        store["dropped"].append(float(stats.dropped_frame_fraction[0]))
        store["mass"].append(float(stats.total_mass[0]))
        store["precision"].append(float(stats.precision[0]))
        store["recall"].append(float(stats.recall[0]))
        # A smooth degree of matching: the perplexity of the frame masses as a fraction of the frames (1: every
        # frame carries its share; 0.5: the mass sits on the equivalent of half the frames).
        masses = stats.frame_mass[0][frame_mask[index]]
        shares = masses / masses.sum().clamp_min(1e-30)
        entropy = -(shares * shares.clamp_min(1e-30).log()).sum()
        store["effective_frames"].append(float(entropy.exp() / masses.numel()))
        # The share of the transported mass on frames inside no word (leading silence, added padding).
        outside = (frame_words < 0) & frame_mask[index]
        store["mass_outside_words"].append(float(word_plan[outside].sum() / word_plan.sum().clamp_min(1e-30)))
        if converged is not None:
            store.setdefault("converged", []).append(float(converged[index]))


# -------------------------------------------------------------------------------------------------------- report


def load_run_metrics(rows, seeds) -> dict:
    """Metrics of every finished run, `{row: {seed: metrics}}`; runs evaluated by another version of the evaluation
    are left out and named (`run --reevaluate` brings them up to date)."""
    found, stale = {}, []
    for row in rows:
        for seed in seeds:
            path = os.path.join(run_dir(row, seed), "experiment_metrics.json")
            if os.path.isfile(path):
                with open(path, encoding="utf-8") as handle:
                    metrics = json.load(handle)
                if metrics.get("eval_version") != EVAL_VERSION:
                    stale.append(f"{row.name} seed {seed}")
                    continue
                # A resumed run's runtime covers its last stretch only; the report leaves it out of the timing.
                metrics["train_resumed"] = os.path.isfile(os.path.join(run_dir(row, seed), "resumed"))
                found.setdefault(row.name, {})[seed] = metrics
    if stale:
        print(f"left out, evaluated by an older evaluation (run --reevaluate): {', '.join(stale)}")
    return found


def _by_seeds(rows: list[Row], seeds) -> list:
    """`[(seeds, rows), ...]`: the seeds asked for, or else each row's own, grouped."""
    if seeds:
        return [(list(seeds), rows)]
    groups = {}
    for row in rows:
        groups.setdefault(row.seeds, []).append(row)
    return [(list(s), group) for s, group in groups.items()]


def _chars_to_ignore() -> list:
    import yaml

    with open(os.path.join(ROOT, BASE_CONFIG), encoding="utf-8") as handle:
        return yaml.safe_load(handle).get("chars_to_ignore")


def run_lm(row_names, seeds, jobs: int) -> None:
    """Train what is missing of the rows, build the language model and its validation corpus, then decode every run
    that has no `lm_metrics.json` yet (each in a process of its own, `jobs` at a time)."""
    from lm_decoding import LM_ROWS, prepare  # experiments/lm_decoding.py

    rows = [ROWS[name] for name in (row_names or LM_ROWS)]
    run_base()
    run_many(rows, seeds, jobs)
    prepare(ROOT, TARGET_CORPUS, run_dir(rows[0], seeds[0]), _chars_to_ignore())
    folders = [run_dir(row, seed) for row in rows for seed in seeds]
    todo = [folder for folder in folders if not os.path.isfile(os.path.join(folder, "lm_metrics.json"))]
    print(f"{len(rows) * len(seeds)} runs asked for, {len(todo)} to decode, {jobs} at a time")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}

    def decode(folder):
        print(f"[{folder}] decoding greedily and with the language model", flush=True)
        with open(os.path.join(folder, "lm.log"), "a", encoding="utf-8") as handle:
            subprocess.run([sys.executable, __file__, "lm-decode", folder], cwd=ROOT, env=env, stdout=handle,
                           stderr=subprocess.STDOUT, check=True)

    with ThreadPoolExecutor(max_workers=jobs) as pool:
        list(pool.map(decode, todo))


def main(argv: Optional[list[str]] = None) -> None:
    global RUNS_DIR
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs-dir", default=RUNS_DIR, help="where the runs live (default: %(default)s)")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("list", help="print every row and the command that reruns it")
    commands.add_parser("base", help="stage 1 of the transfer experiments: corpora and the CTC base model")
    run = commands.add_parser("run", help="train and evaluate the runs not yet done")
    run.add_argument("--rows", nargs="+", choices=sorted(ROWS), help="rows to run (default: all)")
    run.add_argument(
        "--regimes", nargs="+", choices=["clean", "padded", "low-resource", "target-tune", "target"],
        help="only these regimes"
    )
    run.add_argument("--seeds", nargs="+", type=int, help="seeds (default: each row's, 0 1 2 or 0 to 4 for target)")
    run.add_argument("--jobs", type=int, default=1, help="runs at a time (each uses one CPU thread)")
    run.add_argument("--reevaluate", action="store_true", help="evaluate finished runs again (training is kept)")
    evaluate = commands.add_parser("evaluate", help="evaluate one trained run folder")
    evaluate.add_argument("folder")
    evaluate.add_argument("--data_dir", required=True, help="the corpus the run was trained on")
    report = commands.add_parser("report", help="write the tables and plots of docs/RESULTS.md")
    report.add_argument("--seeds", nargs="+", type=int, default=list(DEFAULT_SEEDS))
    report.add_argument("--output", default="docs")
    transfer_report = commands.add_parser("transfer-report", help="write the transfer tables of docs/RESULTS.md")
    transfer_report.add_argument("--output", default="docs")
    lm = commands.add_parser("lm", help="greedy and n-gram decoding of stage-2 runs (experiments/lm_decoding.py)")
    lm.add_argument("--rows", nargs="+", choices=sorted(ROWS), help="rows (default: target_ctc target_uot_anchor)")
    lm.add_argument("--seeds", nargs="+", type=int, default=list(TARGET_SEEDS))
    lm.add_argument("--jobs", type=int, default=1, help="runs trained or decoded at a time")
    lm_one = commands.add_parser("lm-decode", help="greedy and n-gram decoding of one stage-2 run folder")
    lm_one.add_argument("folder")
    lm_report = commands.add_parser("lm-report", help="write the greedy-against-LM table of docs/RESULTS.md")
    lm_report.add_argument("--output", default="docs")
    map_command = commands.add_parser(
        "map", help="the transfer map: step counts, CTC against the oracle, the full rows where it gains "
        "(experiments/transfer_map.py)"
    )
    map_command.add_argument(
        "--cells", nargs="+", help="cells of transfer_map.CELLS (default: transfer_map.DEFAULT_CELLS, every cell)"
    )
    map_command.add_argument("--jobs", type=int, default=1, help="runs at a time (each uses one CPU thread)")
    map_report = commands.add_parser("map-report", help="write the map's tables, plot and CSV into docs/")
    map_report.add_argument("--output", default="docs")
    args = parser.parse_args(argv)
    RUNS_DIR = args.runs_dir

    os.chdir(ROOT)
    if args.command == "list":
        for row in ROWS.values():
            print(f"{row.name:20s} {row.regime:13s} {row.description}\n    {row.command}")
    elif args.command == "base":
        run_base()
    elif args.command == "run":
        rows = [ROWS[name] for name in args.rows] if args.rows else list(ROWS.values())
        if args.regimes:
            rows = [row for row in rows if row.regime in args.regimes]
        if any(row.regime.startswith("target") for row in rows):
            run_base()  # the stage-1 model the target rows fine-tune (read back when done)
        missing = sorted({row.data_dir for row in rows if not os.path.isdir(row.data_dir)})
        if missing:
            raise SystemExit(
                f"Missing corpus {', '.join(missing)}: build it first (make experiments-data, or "
                "python -m modeling_uot_ctc.corpus, see docs/RESULTS.md)."
            )
        for seeds, group in _by_seeds(rows, args.seeds):
            run_many(group, seeds, args.jobs, reevaluate=args.reevaluate)
    elif args.command == "evaluate":
        metrics = evaluate_run(args.folder, args.data_dir)
        print(json.dumps({k: v for k, v in metrics.items() if k != "rho_sweep"}, indent=2))
    elif args.command == "report":
        from report import write_report  # experiments/report.py

        write_report(load_run_metrics(list(ROWS.values()), args.seeds), ROWS, args.output)
    elif args.command == "lm":
        run_lm(args.rows, args.seeds, args.jobs)
    elif args.command == "lm-decode":
        from lm_decoding import decode_run  # experiments/lm_decoding.py

        print(json.dumps(decode_run(args.folder, TARGET_CORPUS, ROOT, _chars_to_ignore()), indent=1))
    elif args.command == "transfer-report":
        from report import write_transfer_report  # experiments/report.py

        rows = {name: row for name, row in ROWS.items() if row.regime.startswith("target")}
        found = {}
        for seeds, group in _by_seeds(list(rows.values()), None):
            found.update(load_run_metrics(group, seeds))
        base_path = os.path.join(BASE_DIR, "experiment_metrics.json")
        base = json.load(open(base_path, encoding="utf-8")) if os.path.isfile(base_path) else None
        write_transfer_report(found, rows, base, args.output)
    elif args.command in ("map", "map-report"):
        import transfer_map  # experiments/transfer_map.py

        runner = sys.modules[__name__]  # the map runs through this module's runner and its --runs-dir
        unknown = sorted(set(getattr(args, "cells", None) or ()) - set(transfer_map.CELLS))
        if unknown:
            parser.error(f"unknown cells {unknown}; the map has {sorted(transfer_map.CELLS)}")
        if args.command == "map":
            transfer_map.run_map(runner, args.cells, args.jobs)
        else:
            transfer_map.write_map_report(runner, args.output)
    elif args.command == "lm-report":
        from lm_decoding import LM_ROWS, load_lm_metrics  # experiments/lm_decoding.py
        from report import write_lm_report  # experiments/report.py

        found_lm = load_lm_metrics(
            {(name, seed): run_dir(ROWS[name], seed) for name in LM_ROWS for seed in TARGET_SEEDS}
        )
        write_lm_report(found_lm, list(LM_ROWS), args.output)


if __name__ == "__main__":
    main()
