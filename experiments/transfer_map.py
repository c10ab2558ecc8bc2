"""The transfer map (docs/RESULTS.md, "Where the transfer pays"): the regimes where alignment-based transfer from the
text model can help at all, the oracle first, and in those regimes how much of the oracle's gain UOT keeps.

    python experiments/run_experiments.py map --jobs 2       # every cell (DEFAULT_CELLS), whatever is not yet done
    python experiments/run_experiments.py map --cells homophones_100_large   # one cell
    python experiments/run_experiments.py map-report         # the table, the plot and docs/results/map_runs.csv

`runner`, the first argument of most functions here, is the experiments' runner module
(experiments/run_experiments.py, as `run_experiments.py map` passes itself): its rows, runs folder and run helpers.

A cell is a corpus and a training budget. Each goes through three steps, every run of them through the experiments'
runner (`run_one`: a finished run is read back, an interrupted one resumes from its checkpoint):

1. **Step count.** CTC alone on the cell's validation split (training sentences held out), evaluated before the
   first step (the base's own CER) and every `TUNE_EVAL_STEPS` up to `TUNE_MAX_STEPS`; the step of lowest validation
   CER is the cell's step count, the same for every row. The learning rate is constant after its warm-up
   (configs/transfer_map.yaml), so a run stopped there has had the schedule the validation run had up to that step
   (on the same data where the cell trains on at most 300 sentences; the 400-sentence cell's count was found on 300).
2. **The gate.** CTC alone against the oracle (each word piece pooled from its word's true frames), `GATE_SEEDS`,
   paired by seed, on the cell's test split.
3. **The full rows**, only where the oracle gains on every gate seed (`gains_against_ctc`: at least
   `GATE_RELATIVE_CER` relative CER or `GATE_HOMOPHONE_POINTS` of homophone accuracy, 95 % interval excluding
   zero): CTC, the oracle, anchored UOT, anchored balanced OT and temporal-order OT (balanced, cosine cost, temporal
   prior), `FULL_SEEDS`.

The homophone cells fine-tune the stage-1 base (`run_experiments.py base`) on sentences whose homophones espeak-ng
speaks alike in every target voice (`python -m modeling_uot_ctc.homophones`), 100 or 400 of them, unpadded: the
question there is spelling from context, not the padding of section 1. The validation split is the last
`VALID_SENTENCES` training sentences in the homophone module's priority order; the cell trains on the first
`min(k, 300)` of the others while its step count is chosen, and on the first k for its rows.
"""

from __future__ import annotations

import csv
import json
import math
import os
import shlex
import subprocess
import sys
from dataclasses import dataclass
from typing import Optional

HOMOPHONE_DIR = "data/homophones"
HOMOPHONE_CORPUS = "data/homophone_target_clean"
MAP_DATA = "data/map"
MAP_CONFIG = "configs/transfer_map.yaml"
VALID_SENTENCES = 100
TUNE_MAX_STEPS = 600
TUNE_EVAL_STEPS = 25
GATE_SEEDS = (0, 1, 2)
FULL_SEEDS = (0, 1, 2, 3, 4)
GATE_ROWS = ("ctc", "oracle")
# The full rows' variants of `run_experiments.VARIANTS` (and TEMPORAL_ORDER_OT), at the table's transfer weight.
FULL_ROWS = ("ctc", "oracle", "uot_anchor", "ot_anchor", "tot")
# Balanced OT with the temporal-order prior on the plain cosine cost, as the temporal-order OT transfer of the
# literature does it; `ot_anchor` is the same with the CTC anchor in the cost.
TEMPORAL_ORDER_OT = ("temporal-order OT: balanced, cosine cost, temporal prior",
                     {"aligner": "ot", "temporal_order_weight": 1.0})
GATE_RELATIVE_CER = 0.03
GATE_HOMOPHONE_POINTS = 0.03
MAP_COMMAND = "python experiments/run_experiments.py map"


LARGE_BASE_DIR = "outputs/transfer/base_large"
LARGE_STUDENT_CONFIG = "configs/student_large.yaml"
# The from-scratch cell trains as stage 1 does, for its 6000 steps; the transfer starts after this many of CTC alone,
# the warm-up the anchored cost needs before the CTC head's posteriors mean anything (section 2's uot_anchor_warm).
SCRATCH_WARMUP_STEPS = 400
SCRATCH_STEPS = 6000  # configs/transfer_base.yaml's max_steps
# The word-piece cell: a CTC head over this many units (the teacher's most frequent pieces of the base corpus, and
# every character: 67 % of the test split's teacher pieces are then one unit each), on the base's encoder. A new
# head learns for longer than a fine-tuning, so its step count is looked for further, on more held-out sentences.
WORD_PIECE_VOCAB_SIZE = 1000
WORD_PIECE_TUNE = dict(tune_max_steps=2000, tune_eval_steps=250, valid_sentences=300)


@dataclass(frozen=True)
class Cell:
    """One regime of the map.

    Args:
        name: the cell's name, part of its rows' names (`map_<name>_<variant>`).
        description: what the cell trains on, for the table.
        train_sentences: fine-tuning cells: the first this many training sentences of the homophone split's
            priority order.
        student: "base" (configs/experiments.yaml's model, 1.3M parameters) or "large" (configs/student_large.yaml,
            5.7M, with a stage-1 base of its own in LARGE_BASE_DIR).
        from_scratch: train as stage 1 does, from random weights on the base corpus, the transfer on after
            SCRATCH_WARMUP_STEPS; no step-count run (the stage-1 recipe's count), tested on the base's test split.
        output_units: "characters" (the base's own vocabulary and head) or "word_pieces": a new CTC head over the
            teacher's word pieces (`--output_units word_pieces`, WORD_PIECE_VOCAB_SIZE units) on the base's encoder,
            fine-tuned on the base corpus (its training sentences but the last `valid_sentences`, which are the
            validation split) and tested on the base's test split. The base's encoder has trained on the
            validation sentences too (stage 1 learns from all of them): only the head has not, so the validation
            CER there is lower than on unheard sentences, and the step count it picks may be early.
        tune_max_steps, tune_eval_steps, valid_sentences: the step-count run's length, evaluation interval and
            held-out sentences, where they differ from TUNE_MAX_STEPS, TUNE_EVAL_STEPS and VALID_SENTENCES.
    """

    name: str
    description: str
    train_sentences: int = 0
    student: str = "base"
    from_scratch: bool = False
    output_units: str = "characters"
    tune_max_steps: Optional[int] = None
    tune_eval_steps: Optional[int] = None
    valid_sentences: Optional[int] = None

    @property
    def tune_steps(self) -> tuple[int, int]:
        """`(last step, evaluation interval)` of the cell's step-count run."""
        return self.tune_max_steps or TUNE_MAX_STEPS, self.tune_eval_steps or TUNE_EVAL_STEPS

    @property
    def corpus(self) -> str:
        """The cell's corpus: manifests over HOMOPHONE_CORPUS (its train split, and the whole test split)."""
        return os.path.join(MAP_DATA, self.name)

    @property
    def tune_corpus(self) -> str:
        """The cell's validation corpus: its `test` split is the held-out training sentences."""
        return os.path.join(MAP_DATA, f"{self.name}_tune")

    @property
    def command(self) -> str:
        """The command that runs this cell (every step of it not yet done)."""
        return f"{MAP_COMMAND} --cells {self.name}"

    def base(self, runner) -> tuple[str, tuple]:
        """`(folder, config files)` of the stage-1 base this cell's student starts from."""
        if self.student == "large":
            return LARGE_BASE_DIR, (*runner.BASE_CONFIGS, LARGE_STUDENT_CONFIG)
        return runner.BASE_DIR, runner.BASE_CONFIGS


CELLS = {
    cell.name: cell
    for cell in (
        Cell("homophones_100", "homophone target, base fine-tuned on 100 sentences", 100),
        Cell("homophones_400", "homophone target, base fine-tuned on 400 sentences", 400),
        Cell("from_scratch", "stage 1 itself: 6000 steps from random weights on the base corpus, the transfer on "
             f"after {SCRATCH_WARMUP_STEPS}", from_scratch=True),
        Cell("homophones_100_large", "homophone target, 100 sentences, a student 4.4 times larger (its own base)",
             100, student="large"),
        Cell("word_piece_units", f"the CTC's output units made the teacher's word pieces ({WORD_PIECE_VOCAB_SIZE}): a "
             "new head on the base's encoder, fine-tuned on the base corpus", output_units="word_pieces",
             **WORD_PIECE_TUNE),
    )
}
# The cells `map` runs when none are named: the whole map, so that one resumable command makes it. The long ones
# come last: the from-scratch cell (six 6000-step trainings on one thread each) and the larger student, whose own
# base is a 6000-step training of a model 4.4 times larger (or scripts/gpu_map_cell.py on a GPU).
DEFAULT_CELLS = ("homophones_100", "homophones_400", "word_piece_units", "from_scratch", "homophones_100_large")


# ------------------------------------------------------------------------------------------------------------ data


def build_data(runner, log=print, cells=None) -> None:
    """The homophone split (excluding the base corpus's sentences), its spoken corpus, and the manifests of the
    fine-tuning cells; whatever is missing.

    Args:
        runner: the experiments' runner module.
        log: where progress lines go.
        cells: the cells whose manifests to write (default: every cell of CELLS).
    """
    if not os.path.isfile(os.path.join(HOMOPHONE_DIR, "homophones.json")):
        command = (f"python -m modeling_uot_ctc.homophones --voices target --output {HOMOPHONE_DIR} "
                   f"--exclude-corpus {runner.BASE_CORPUS}")
        log(f"building {HOMOPHONE_DIR}: {command}")
        subprocess.run([sys.executable, *shlex.split(command)[1:]], check=True)
    if not os.path.isfile(os.path.join(HOMOPHONE_CORPUS, "test", "metadata.csv")):
        with open(os.path.join(HOMOPHONE_DIR, "homophones.json"), encoding="utf-8") as handle:
            command = json.load(handle)["corpus_command"]
        log(f"building {HOMOPHONE_CORPUS}: {command}")
        subprocess.run([sys.executable, *shlex.split(command)[1:]], check=True)
    for cell in cells or CELLS.values():
        if cell.output_units == "word_pieces":
            write_base_cell_corpora(runner, cell)
        elif not cell.from_scratch:
            write_cell_corpora(runner, cell)


def priority_order(corpus: str, description: str) -> list[dict]:
    """The training rows of `corpus` in the homophone split's priority order (`homophones.json`'s `train` list: the
    first sentences cover the most homophone sets)."""
    from modeling_uot_ctc.corpus import read_corpus

    with open(description, encoding="utf-8") as handle:
        rank = {entry["text"]: index for index, entry in enumerate(json.load(handle)["train"])}
    rows = read_corpus(corpus, ["train"])
    missing = [row["text"] for row in rows if row["text"] not in rank]
    if missing:
        raise ValueError(f"{corpus}: {len(missing)} training sentences are not in {description}, e.g. {missing[0]!r}")
    return sorted(rows, key=lambda row: rank[row["text"]])


def write_cell_corpora(runner, cell: Cell) -> None:
    """The cell's corpus (first `train_sentences` training rows, the whole test split) and its validation corpus
    (the last VALID_SENTENCES training rows as `test`, the first `train_sentences` of the others as `train`), as
    manifests over HOMOPHONE_CORPUS."""
    ordered = priority_order(HOMOPHONE_CORPUS, os.path.join(HOMOPHONE_DIR, "homophones.json"))
    if len(ordered) < cell.train_sentences or len(ordered) <= VALID_SENTENCES:
        raise ValueError(f"{HOMOPHONE_CORPUS} has {len(ordered)} training rows; {cell.name} needs "
                         f"{cell.train_sentences}, and more than {VALID_SENTENCES} to hold some out.")
    tune_train = ordered[: min(cell.train_sentences, len(ordered) - VALID_SENTENCES)]
    _write_cell_manifests(runner, cell, HOMOPHONE_CORPUS, ordered[: cell.train_sentences], tune_train,
                          ordered[-VALID_SENTENCES:])


def write_base_cell_corpora(runner, cell: Cell) -> None:
    """A cell on the base corpus: its training rows but the last `valid_sentences` as `train` (of the cell and of
    its validation corpus), those last rows as the validation corpus's `test`, and the base's test split as the
    cell's `test`; manifests over runner.BASE_CORPUS."""
    from modeling_uot_ctc.corpus import read_corpus

    held_out = cell.valid_sentences or VALID_SENTENCES
    rows = read_corpus(runner.BASE_CORPUS, ["train"])
    if len(rows) <= held_out:
        raise ValueError(f"{runner.BASE_CORPUS} has {len(rows)} training rows; {cell.name} holds {held_out} out.")
    _write_cell_manifests(runner, cell, runner.BASE_CORPUS, rows[:-held_out], rows[:-held_out], rows[-held_out:])


def _write_cell_manifests(runner, cell: Cell, corpus: str, train: list, tune_train: list, valid: list) -> None:
    """The cell's corpus (`train`, and `corpus`'s whole test split) and its validation corpus (`tune_train`, and
    `valid` as its `test`), as manifests over the audio of `corpus`; `train`, `tune_train` and `valid` are rows of
    `corpus`'s training split (`read_corpus`)."""
    source_train, source_test = (os.path.join(corpus, split) for split in ("train", "test"))
    # Without read_corpus's absolute path: the manifests keep the corpus's own columns.
    train, tune_train, valid = ([{k: v for k, v in row.items() if k != "path"} for row in rows]
                                for rows in (train, tune_train, valid))
    with open(os.path.join(source_test, "metadata.csv"), newline="", encoding="utf-8") as handle:
        test_rows = list(csv.DictReader(handle))
    runner.write_manifest(train, source_train, os.path.join(cell.corpus, "train"))
    runner.write_manifest(test_rows, source_test, os.path.join(cell.corpus, "test"))
    runner.write_manifest(tune_train, source_train, os.path.join(cell.tune_corpus, "train"))
    runner.write_manifest(valid, source_train, os.path.join(cell.tune_corpus, "test"))


# ------------------------------------------------------------------------------------------------------------ rows


def tune_row(runner, cell: Cell):
    """CTC alone on the cell's validation corpus, evaluated every TUNE_EVAL_STEPS (or the cell's own interval)."""
    last_step, interval = cell.tune_steps
    # Evaluated before the first step too: the base's own validation CER, the point fine-tuning has to beat.
    flags = {"aligner": "none", "max_steps": last_step, "do_eval": True, "eval_strategy": "steps",
             "eval_steps": interval, "eval_on_start": True, "save_steps": interval}
    flags.update(_student_flags(runner, cell))
    return runner.Row(f"map_{cell.name}_tune", "map-tune", "CTC alone, validation split, step count", flags,
                      corpus=cell.tune_corpus, configs=(*runner.TARGET_CONFIGS, MAP_CONFIG), rerun=cell.command)


def _student_flags(runner, cell: Cell) -> dict:
    """A fine-tuning cell's starting point and vocabulary, where they are not configs/transfer_finetune.yaml's."""
    folder, _ = cell.base(runner)
    plain = os.path.join(folder, "plain")
    flags = {} if folder == runner.BASE_DIR else {"model_name_or_path": plain, "tokenizer_name_or_path": plain}
    if cell.output_units == "word_pieces":
        # No tokenizer given: the script builds the word-piece vocabulary of the cell's training text, and the
        # base's character head is replaced by a new one of that size.
        flags.update(tokenizer_name_or_path="", output_units="word_pieces",
                     word_piece_vocab_size=WORD_PIECE_VOCAB_SIZE)
    return flags


def chosen_steps(runner, cell: Cell) -> Optional[dict]:
    """The cell's step count from its validation run: `{"steps", "validation_cer", "last_cer", "base_cer",
    "curve"}`, where `curve` is `[(step, cer), ...]` and `base_cer` the CER before the first step; None until that
    run has finished. The count is at least one evaluation interval: where the base itself reads the validation
    split best, the table shows it (`base_cer` below every other point), and the rows still fine-tune."""
    if cell.from_scratch:
        return {"steps": SCRATCH_STEPS, "validation_cer": math.nan, "last_cer": math.nan, "base_cer": math.nan,
                "curve": []}
    path = os.path.join(runner.run_dir(tune_row(runner, cell), 0), "trainer_state.json")
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as handle:
        state = json.load(handle)
    curve = [(entry["step"], entry["eval_cer"]) for entry in state["log_history"] if "eval_cer" in entry]
    if not curve or curve[-1][0] < cell.tune_steps[0]:
        return None
    base_cer = curve[0][1] if curve[0][0] == 0 else math.nan
    step, cer = min((p for p in curve if p[0] > 0), key=lambda point: (point[1], point[0]))  # ties: the earlier step
    return {"steps": step, "validation_cer": cer, "last_cer": curve[-1][1], "base_cer": base_cer, "curve": curve}


def map_rows(runner, cell: Cell, steps: int, variants=FULL_ROWS) -> list:
    """The cell's rows at its step count: each variant of `runner.VARIANTS` at the table's transfer weight.

    Args:
        runner: the experiments' runner module.
        cell: the map's cell.
        steps: the cell's step count (`chosen_steps`).
        variants: names of `runner.VARIANTS`, or "tot" (TEMPORAL_ORDER_OT).
    """
    rows = []
    for variant in variants:
        description, flags = TEMPORAL_ORDER_OT if variant == "tot" else runner.VARIANTS[variant]
        flags = {**runner._table_flags(flags), "max_steps": steps}
        if cell.from_scratch:
            # Stage 1's recipe and corpus; no plain export (only the base's is loaded by other rows).
            flags.update(plain_model_dir="")
            if flags["aligner"] != "none":
                flags.update(kt_warmup_steps=SCRATCH_WARMUP_STEPS)
            rows.append(runner.Row(f"map_{cell.name}_{variant}", "map", description, flags,
                                   corpus=runner.BASE_CORPUS, configs=runner.BASE_CONFIGS, rerun=cell.command))
            continue
        rows.append(runner.Row(
            f"map_{cell.name}_{variant}", "map", description, {**flags, **_student_flags(runner, cell)},
            corpus=cell.corpus, configs=(*runner.TARGET_CONFIGS, MAP_CONFIG), rerun=cell.command,
        ))
    return rows


# ---------------------------------------------------------------------------------------------------------- gate


def gains_against_ctc(found: dict, cell: Cell, variant: str = "oracle", seeds=None) -> Optional[dict]:
    """A variant against CTC alone in one cell, paired by seed: the relative CER change and the change of homophone
    accuracy (points as fractions), each with its 95 % t-interval, and whether it passes the gate (a gain of at
    least GATE_RELATIVE_CER or GATE_HOMOPHONE_POINTS whose interval excludes zero).

    The relative change divides each seed's CER difference by CTC's mean CER over the paired seeds, taken as a
    constant: the interval is that of the differences, scaled.

    Args:
        found: `{row name: {seed: metrics}}` (`runner.load_run_metrics`).
        cell: the map's cell.
        variant: the row's variant ("oracle", "uot_anchor", ...).
        seeds: only these seeds, and all of them (None where one is missing); default: every seed both rows have,
            at least two.
    """
    import numpy as np

    from report import t_interval  # experiments/report.py

    ctc, other = found.get(f"map_{cell.name}_ctc", {}), found.get(f"map_{cell.name}_{variant}", {})
    paired = sorted(set(ctc) & set(other))
    if seeds is not None:
        if not set(seeds) <= set(paired):
            return None
        paired = sorted(seeds)
    seeds = paired
    if len(seeds) < 2:
        return None
    base_cer = float(np.mean([ctc[s]["cer"] for s in seeds]))
    relative = [(other[s]["cer"] - ctc[s]["cer"]) / base_cer for s in seeds]
    homophone = [other[s]["homophones"]["homophone_accuracy"] - ctc[s]["homophones"]["homophone_accuracy"]
                 for s in seeds if "homophones" in other[s] and "homophones" in ctc[s]]
    result = {"seeds": seeds, "relative_cer": float(np.mean(relative)), "relative_cer_ci": t_interval(relative)}
    passes = result["relative_cer"] <= -GATE_RELATIVE_CER and result["relative_cer_ci"][1] < 0
    if len(homophone) >= 2:
        result["homophone_points"] = float(np.mean(homophone))
        result["homophone_points_ci"] = t_interval(homophone)
        passes |= result["homophone_points"] >= GATE_HOMOPHONE_POINTS and result["homophone_points_ci"][0] > 0
    result["passes"] = bool(passes)
    return result


# ------------------------------------------------------------------------------------------------------- running


def run_map(runner, cell_names=None, jobs: int = 1, log=print) -> None:
    """Every step of the cells asked for that is not yet done: the bases, the data, the step counts, the gate, and
    the full rows where the gate passes on every GATE_SEEDS seed.

    Args:
        runner: the experiments' runner module.
        cell_names: names of CELLS (default: DEFAULT_CELLS).
        jobs: trainings at a time, one CPU thread each.
        log: where progress lines go.
    """
    cells = [CELLS[name] for name in (cell_names or DEFAULT_CELLS)]
    fine_tuning = [cell for cell in cells if not cell.from_scratch]
    for folder, configs in dict.fromkeys(cell.base(runner) for cell in fine_tuning):
        runner.run_base(log, folder, configs)
    runner.build_transfer_corpora(log, base_only=True)  # the from-scratch cell's corpus
    build_data(runner, log, fine_tuning)
    runner.run_many([tune_row(runner, cell) for cell in fine_tuning], [0], jobs)
    steps = {}
    for cell in cells:
        choice = chosen_steps(runner, cell)
        if choice is None:  # its validation run failed, or another runner holds it
            log(f"[{cell.name}] no step count yet: its validation run has not finished; left for now")
            continue
        steps[cell.name] = choice["steps"]
        log(f"[{cell.name}] step count: {steps[cell.name]}")
    cells = [cell for cell in cells if cell.name in steps]
    gate = [row for cell in cells for row in map_rows(runner, cell, steps[cell.name], GATE_ROWS)]
    refuse_other_step_counts(runner, gate, FULL_SEEDS)
    runner.run_many(gate, list(GATE_SEEDS), jobs)
    found = runner.load_run_metrics(gate, GATE_SEEDS)
    full = []
    for cell in cells:
        gains = gains_against_ctc(found, cell, seeds=GATE_SEEDS)
        log(f"[{cell.name}] oracle against CTC alone: {describe_gains(gains)}")
        if gains and gains["passes"]:
            full += map_rows(runner, cell, steps[cell.name], FULL_ROWS)
    if full:
        refuse_other_step_counts(runner, full, FULL_SEEDS)
        runner.run_many(full, list(FULL_SEEDS), jobs)


def trained_other_steps(runner, row, seed: int) -> bool:
    """Whether the run folder of `row` and `seed` finished a training of another step count than the row asks for
    (its `trainer_state.json`; a folder without one has finished nothing)."""
    path = os.path.join(runner.run_dir(row, seed), "trainer_state.json")
    if not os.path.isfile(path):
        return False
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)["global_step"] != row.flags["max_steps"]


def refuse_other_step_counts(runner, rows, seeds) -> None:
    """Stop where a finished run of `rows` trained for another step count than its row's (the step count was chosen
    again, after a change): the runner would read it back as done."""
    stale = [runner.run_dir(row, seed) for row in rows for seed in seeds
             if trained_other_steps(runner, row, seed)]
    if stale:
        raise SystemExit("These runs trained for another step count than their cell's now; move them away and run "
                         "again:\n  " + "\n  ".join(stale))


def describe_gains(gains: Optional[dict]) -> str:
    """One line: a row's relative CER change and homophone-accuracy change against CTC alone, and the gate."""
    if gains is None:
        return "not all gate seeds paired yet"
    text = (f"CER {gains['relative_cer']:+.1%} (95 % CI {gains['relative_cer_ci'][0]:+.1%} to "
            f"{gains['relative_cer_ci'][1]:+.1%})")
    if "homophone_points" in gains:
        low, high = gains["homophone_points_ci"]
        text += (f", homophone accuracy {100 * gains['homophone_points']:+.1f} points "
                 f"({100 * low:+.1f} to {100 * high:+.1f})")
    return text + (": passes the gate" if gains["passes"] else ": below the gate")


# -------------------------------------------------------------------------------------------------------- report

MAP_START, MAP_END = "<!-- map-table:start -->", "<!-- map-table:end -->"
CSV_FIELDS = ("cell", "row", "seed", "steps", "cer", "wer", "homophone_accuracy", "control_accuracy",
              "homophone_words", "set_confusion_share", "precision", "recall", "dropped", "train_minutes",
              "train_resumed")


def collect(runner) -> tuple[dict, dict, dict]:
    """`(steps, rows, found)`: each cell's step choice, its rows (`{cell: [Row, ...]}`), and the finished runs at
    the cell's step count (a run of another count is left out and named)."""
    steps, rows, found = {}, {}, {}
    for cell in CELLS.values():
        steps[cell.name] = chosen_steps(runner, cell)
        if steps[cell.name] is None:
            continue
        rows[cell.name] = map_rows(runner, cell, steps[cell.name]["steps"])
        for name, runs in runner.load_run_metrics(rows[cell.name], FULL_SEEDS).items():
            row = next(r for r in rows[cell.name] if r.name == name)
            for seed in list(runs):
                if trained_other_steps(runner, row, seed):
                    print(f"left out, trained for another step count than {row.flags['max_steps']}: "
                          f"{runner.run_dir(row, seed)}")
                    del runs[seed]
            found[name] = runs
            if not cell.from_scratch:
                for seed, metrics in runs.items():
                    add_set_confusions(runner, cell, runner.run_dir(row, seed), metrics)
    return steps, rows, found


def add_set_confusions(runner, cell: Cell, folder: str, metrics: dict) -> None:
    """Add to a finished run's `metrics["homophones"]` how many of the test split's homophone words its transcripts
    wrote as another member of the word's set (`homophone_accuracy`'s `set_confusions`): the errors that knowing the
    context could fix, read from the run's `experiment_predictions.json` and the sets of HOMOPHONE_DIR."""
    from modeling_uot_ctc.data import normalise_text
    from modeling_uot_ctc.homophone_accuracy import homophone_accuracy

    predictions_path = os.path.join(folder, "experiment_predictions.json")
    if "homophones" not in metrics or not os.path.isfile(predictions_path):
        return
    with open(predictions_path, encoding="utf-8") as handle:
        predictions = json.load(handle)
    with open(os.path.join(HOMOPHONE_DIR, "homophones.json"), encoding="utf-8") as handle:
        sets = json.load(handle)["sets"]
    with open(os.path.join(cell.corpus, "test", "metadata.csv"), newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    chars_to_ignore = runner._chars_to_ignore()
    scores = homophone_accuracy(
        [normalise_text(row["text"], chars_to_ignore, True) for row in rows],
        [predictions[row["file_name"]] for row in rows], [json.loads(row["homophones"]) for row in rows], sets=sets,
    )
    if scores["homophone_words"] != metrics["homophones"]["homophone_words"]:
        raise ValueError(f"{folder}: {scores['homophone_words']} homophone words in {cell.corpus}, "
                         f"{metrics['homophones']['homophone_words']} when the run was evaluated.")
    metrics["homophones"].update(set_confusions=scores["set_confusions"],
                                 set_confusion_share=scores["set_confusion_share"])


def run_records(steps: dict, rows: dict, found: dict) -> list[dict]:
    """One record per finished run, with CSV_FIELDS (NaN where a field does not apply, e.g. a plan for CTC)."""
    records = []
    for cell, cell_rows in rows.items():
        for row in cell_rows:
            for seed, metrics in sorted(found.get(row.name, {}).items()):
                homophones = metrics.get("homophones", {})
                alignment = metrics.get("alignment", {})
                records.append({
                    "cell": cell, "row": row.name.removeprefix(f"map_{cell}_"), "seed": seed,
                    "steps": steps[cell]["steps"], "cer": metrics["cer"], "wer": metrics["wer"],
                    "homophone_accuracy": homophones.get("homophone_accuracy", math.nan),
                    "control_accuracy": homophones.get("control_accuracy", math.nan),
                    "homophone_words": homophones.get("homophone_words", math.nan),
                    "set_confusion_share": homophones.get("set_confusion_share", math.nan),
                    "precision": alignment.get("precision", math.nan), "recall": alignment.get("recall", math.nan),
                    "dropped": alignment.get("dropped", math.nan),
                    # A resumed run's training time covers its last stretch only.
                    "train_minutes": math.nan if metrics.get("train_minutes") is None else metrics["train_minutes"],
                    "train_resumed": bool(metrics.get("train_resumed")),
                })
    return records


def _interval_cell(gains: Optional[dict], key: str, scale: float, unit: str) -> str:
    """`+x.x unit (95 % CI ...)` of one of `gains_against_ctc`'s changes, scaled; "–" where it has none."""
    if not gains or key not in gains:
        return "–"
    low, high = gains[f"{key}_ci"]
    return f"{scale * gains[key]:+.1f}{unit} (95 % CI {scale * low:+.1f} to {scale * high:+.1f})"


def _share(gains: Optional[dict], oracle: Optional[dict]) -> str:
    """A row's CER gain as a share of the oracle's, only where the oracle's CER gain is real (the gate passed and
    its CER interval excludes zero; a gate passed on homophone accuracy alone gives no CER to share)."""
    if not gains or not oracle or not oracle["passes"] or oracle["relative_cer_ci"][1] >= 0:
        return "–"
    return f"{gains['relative_cer'] / oracle['relative_cer']:.0%}"


def map_table(steps: dict, rows: dict, found: dict) -> str:
    """The map, a line per cell: the step count, the gate, CTC alone, the oracle's gain, what the aligners keep of
    it (on every seed the rows share, up to FULL_SEEDS), homophone accuracy.

    Args:
        steps: each cell's `chosen_steps`.
        rows: each cell's rows.
        found: the finished runs, `{row name: {seed: metrics}}`.
    """
    import numpy as np

    from report import mean_spread  # experiments/report.py

    lines = [
        "| cell | steps (validation CER: base, chosen step, last step) | gate, oracle on the 3 gate seeds | seeds "
        "| CTC CER | oracle ΔCER | oracle Δ homophone accuracy | UOT ΔCER | UOT's share | balanced OT's share "
        "| temporal-order OT's share | homophone accuracy: CTC / oracle / UOT (CTC's control) | n-gram LM | command |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for cell in CELLS.values():
        choice = steps.get(cell.name)
        if choice is None:
            lines.append(f"| {cell.name}: {cell.description} | not run yet |" + " |" * 11 + f" `{cell.command}` |")
            continue
        runs = lambda variant: found.get(f"map_{cell.name}_{variant}", {})  # noqa: E731
        oracle = gains_against_ctc(found, cell)
        gate = gains_against_ctc(found, cell, seeds=GATE_SEEDS)
        verdict = "not decided" if gate is None else "passes" if gate["passes"] else "shut"
        gains = {v: gains_against_ctc(found, cell, v) for v in ("uot_anchor", "ot_anchor", "tot")}
        accuracy = lambda v: [m["homophones"]["homophone_accuracy"] for m in runs(v).values()  # noqa: E731
                              if "homophones" in m]
        control = [m["homophones"]["control_accuracy"] for m in runs("ctc").values() if "homophones" in m]
        accuracies = " / ".join(f"{np.mean(accuracy(v)):.3f}" if accuracy(v) else "–"
                                for v in ("ctc", "oracle", "uot_anchor"))
        # A new head (another vocabulary) reads nothing before its first step: no base CER to show.
        start = "new head" if cell.output_units != "characters" else f"{choice['base_cer']:.3f}"
        columns = [
            f"{choice['steps']} ({start}, {choice['validation_cer']:.3f}, {choice['last_cer']:.3f})"
            if choice["curve"] else f"{choice['steps']} (stage 1's recipe)", verdict,
            str(len(runs("ctc"))), mean_spread([m["cer"] for m in runs("ctc").values()], 4),
            _interval_cell(oracle, "relative_cer", 100, " %"), _interval_cell(oracle, "homophone_points", 100, " pt"),
            _interval_cell(gains["uot_anchor"], "relative_cer", 100, " %"),
            _share(gains["uot_anchor"], oracle), _share(gains["ot_anchor"], oracle), _share(gains["tot"], oracle),
            f"{accuracies} ({np.mean(control):.3f})" if control else accuracies,
            "only where the gate passes" if verdict != "passes" else "not run yet",
        ]
        lines.append(f"| {cell.name}: {cell.description} | " + " | ".join(columns) + f" | `{cell.command}` |")
    return "\n".join(lines) + "\n"


def runs_table(rows: dict, found: dict) -> str:
    """Every row of every cell: seeds, CER, WER, homophone accuracy and its control, and the plan's scores."""
    from report import mean_spread  # experiments/report.py

    lines = ["| cell | row | seeds | CER | WER | homophone accuracy | control accuracy | homophones written as "
             "another member of their set | plan precision | plan recall | dropped frames |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for cell, cell_rows in rows.items():
        for row in cell_rows:
            runs = list(found.get(row.name, {}).values())
            if not runs:
                continue
            pick = lambda *keys: [_dig(m, keys) for m in runs]  # noqa: E731
            lines.append(
                f"| {cell} | {row.name.removeprefix(f'map_{cell}_')} | {len(runs)} | {mean_spread(pick('cer'), 4)} "
                f"| {mean_spread(pick('wer'), 4)} | {mean_spread(pick('homophones', 'homophone_accuracy'))} "
                f"| {mean_spread(pick('homophones', 'control_accuracy'))} "
                f"| {mean_spread(pick('homophones', 'set_confusion_share'))} "
                f"| {mean_spread(pick('alignment', 'precision'))} | {mean_spread(pick('alignment', 'recall'))} "
                f"| {mean_spread(pick('alignment', 'dropped'))} |"
            )
    return "\n".join(lines) + "\n"


def _dig(metrics: dict, keys) -> Optional[float]:
    """`metrics[k1][k2]...`, None where a key is missing."""
    for key in keys:
        if not isinstance(metrics, dict) or key not in metrics:
            return None
        metrics = metrics[key]
    return metrics


def plot_map(steps: dict, found: dict, path: str) -> None:
    """Per cell, each row's paired change against CTC alone with its 95 % interval: relative CER (left) and
    homophone accuracy in points (right).

    Args:
        steps: each cell's `chosen_steps` (cells without one are left out).
        found: the finished runs, `{row name: {seed: metrics}}`.
        path: the PNG file to write.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells = [cell for cell in CELLS.values() if steps.get(cell.name)]
    # Only the rows that ran somewhere, centred on each cell's line.
    variants = [v for v in FULL_ROWS if v != "ctc" and any(gains_against_ctc(found, c, v) for c in cells)]
    figure, axes = plt.subplots(1, 2, figsize=(11, 0.9 + 0.9 * max(1, len(cells))), sharey=True)
    for offset, variant in enumerate(variants):
        for index, cell in enumerate(cells):
            gains = gains_against_ctc(found, cell, variant)
            if not gains:
                continue
            y = index + 0.15 * (offset - (len(variants) - 1) / 2)
            for axis, key in zip(axes, ("relative_cer", "homophone_points")):
                if key in gains:
                    low, high = gains[f"{key}_ci"]
                    axis.errorbar(100 * gains[key], y, xerr=[[100 * (gains[key] - low)], [100 * (high - gains[key])]],
                                  fmt="o", color=f"C{offset}", label=variant if index == 0 else None, capsize=3)
    for axis, label in zip(axes, ("CER change against CTC alone (%)", "homophone accuracy change (points)")):
        axis.axvline(0, color="grey", lw=0.8)
        axis.set_xlabel(label)
    axes[0].set_yticks(range(len(cells)), [cell.name for cell in cells])
    handles, labels = axes[0].get_legend_handles_labels()
    if handles:
        axes[1].legend(handles, labels, fontsize=8, loc="best")
    figure.suptitle("The transfer map: each row against CTC alone, paired by seed, 95 % intervals")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def write_map_report(runner, output: str) -> None:
    """`<output>/results/map_runs.csv` (a line per run), `<output>/results/map.png`, and the map's tables in
    `<output>/RESULTS.md` between MAP_START and MAP_END (added at the end when missing).

    Args:
        runner: the experiments' runner module.
        output: the docs folder.
    """
    from report import write_between_markers  # experiments/report.py

    steps, rows, found = collect(runner)
    results = os.path.join(output, "results")
    os.makedirs(results, exist_ok=True)
    records = run_records(steps, rows, found)
    with open(os.path.join(results, "map_runs.csv"), "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=CSV_FIELDS)
        writer.writeheader()
        writer.writerows(records)
    plot_map(steps, found, os.path.join(results, "map.png"))
    curves = "".join(
        f"- {name}: validation CER by step " + ", ".join(f"{step}: {cer:.3f}" for step, cer in choice["curve"]) + "\n"
        for name, choice in steps.items() if choice and choice["curve"]
    )
    generated = (
        f"{MAP_START}\n<!-- written by `python experiments/run_experiments.py map-report` from the runs' folders, "
        "as docs/results/map_runs.csv is; edit the prose only -->\n\n"
        + map_table(steps, rows, found)
        + "\nEvery finished row (mean ± sd over seeds):\n\n" + runs_table(rows, found)
        + "\nThe step counts, CTC alone on each cell's validation split:\n\n" + curves + f"{MAP_END}"
    )
    path = os.path.join(output, "RESULTS.md")
    write_between_markers(path, MAP_START, MAP_END, generated)
    print(f"wrote the map into {path}, {results}/map_runs.csv ({len(records)} runs) and {results}/map.png")
