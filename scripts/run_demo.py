"""The offline demo behind `make demo`: build the corpus, train CTC-only and UOT-KT models, compare, transcribe, plot.

    python scripts/run_demo.py [--steps 400] [--utterances 3000]

1. Builds the synthetic corpus (WordNet sentences spoken by espeak-ng) in data/demo_corpus unless it is there.
2. Trains two models from scratch with configs/demo.yaml for the same number of steps, side by side (one CPU
   thread each, so that their training times compare): plain CTC (`configs/ablation_ctc.yaml` layered on top)
   and UOT knowledge transfer from the MiniLM teacher.
3. Prints WER, CER and training time of both on the test split.
4. Transcribes a few test files with the stock `pipeline("automatic-speech-recognition")` from the saved UOT folder.
5. Writes a picture of one test utterance's transport plan (frames x word pieces).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CORPUS = os.path.join(REPO, "data", "demo_corpus")
OUTPUTS = os.path.join(REPO, "outputs")


def build_corpus(utterances: int) -> None:
    if os.path.isfile(os.path.join(CORPUS, "test", "metadata.csv")):
        print(f"corpus: reusing {CORPUS}")
        return
    subprocess.run([sys.executable, "-m", "modeling_uot_ctc.corpus", "--output", CORPUS,
                    "--utterances", str(utterances), "--seed", "0"], cwd=REPO, check=True)


def train_both(steps: int) -> dict:
    """Start both trainings at once, one thread each; returns their wall-clock times in seconds."""
    runs = {
        "CTC only": [os.path.join(REPO, "configs", "demo.yaml"), os.path.join(REPO, "configs", "ablation_ctc.yaml"),
                     "--output_dir", os.path.join(OUTPUTS, "demo_ctc")],
        "UOT-KT": [os.path.join(REPO, "configs", "demo.yaml"), "--output_dir", os.path.join(OUTPUTS, "demo_uot")],
    }
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    processes, started, logs = {}, {}, {}
    for name, args in runs.items():
        log_path = os.path.join(OUTPUTS, f"{args[-1].split(os.sep)[-1]}.log")
        os.makedirs(OUTPUTS, exist_ok=True)
        logs[name] = open(log_path, "w")
        command = [sys.executable, os.path.join(REPO, "run_speech_recognition_uot.py"), *args,
                   "--max_steps", str(steps), "--report_to", "none", "--disable_tqdm", "true",
                   "--logging_steps", "25", "--save_strategy", "no", "--dataloader_num_workers", "0"]
        started[name] = time.time()
        processes[name] = subprocess.Popen(command, cwd=REPO, env=env, stdout=logs[name], stderr=subprocess.STDOUT)
        print(f"training {name}: log in {log_path}")
    durations = {}
    last_report = 0.0
    while len(durations) < len(processes):
        time.sleep(5)
        for name, process in processes.items():
            if name not in durations and process.poll() is not None:
                durations[name] = time.time() - started[name]
                if process.returncode != 0:
                    raise SystemExit(f"training {name} failed; see {logs[name].name}")
        if time.time() - last_report > 30:
            last_report = time.time()
            print("  " + "; ".join(f"{name}: {latest_step(logs[name].name, steps)}" for name in processes), flush=True)
    return durations


def latest_step(log_path: str, steps: int) -> str:
    """The last logged step of a run, for the progress line."""
    step = 0
    with open(log_path, errors="replace") as handle:
        for line in handle:
            if "'epoch'" in line and "'loss'" in line:
                step += 25
    return f"step {min(step, steps)}/{steps}"


def report(durations: dict) -> None:
    print("\nTest split (300 utterances; half in voices never heard in training):")
    print(f"{'model':<10} {'WER':>7} {'CER':>7} {'training':>10}")
    for name, folder in (("CTC only", "demo_ctc"), ("UOT-KT", "demo_uot")):
        results = json.load(open(os.path.join(OUTPUTS, folder, "eval_results.json")))
        print(f"{name:<10} {results['eval_wer']:>7.3f} {results['eval_cer']:>7.3f} {durations[name] / 60:>8.1f} min")


def transcribe_and_plot(count: int = 3) -> None:
    import soundfile
    import torch
    from transformers import AutoProcessor, pipeline

    from modeling_uot_ctc import Wav2Vec2ForCTCWithUOT
    from modeling_uot_ctc.plotting import plot_alignment
    from modeling_uot_ctc.teacher import TextTeacher

    folder = os.path.join(OUTPUTS, "demo_uot")
    rows = list(csv.DictReader(open(os.path.join(CORPUS, "test", "metadata.csv"))))[:count]
    asr = pipeline("automatic-speech-recognition", model=folder, device=-1)
    print(f"\nThe stock pipeline on {count} test files, from {folder}:")
    for row in rows:
        path = os.path.join(CORPUS, "test", row["file_name"])
        hypothesis = asr(soundfile.read(path, dtype="float32")[0])["text"]  # a 16 kHz array needs no ffmpeg
        print(f"  {row['file_name']}  reference: {row['text']}\n  {'':{len(row['file_name'])}}  pipeline:  {hypothesis}")

    model = Wav2Vec2ForCTCWithUOT.from_pretrained(folder).eval()
    processor = AutoProcessor.from_pretrained(folder)
    teacher = TextTeacher()
    row = rows[0]
    audio, _ = soundfile.read(os.path.join(CORPUS, "test", row["file_name"]), dtype="float32")
    inputs = processor(audio, sampling_rate=16_000, return_tensors="pt")
    text = row["text"].lower()
    states = teacher([text])
    with torch.no_grad():
        out = model(inputs.input_values, teacher_hidden_states=states.hidden_states,
                    teacher_attention_mask=states.attention_mask, output_alignments=True)
    picture = os.path.join(folder, "alignment.png")
    plot_alignment(out.alignments[0], picture, tokens=states.tokens[0], frame_rate=50, title=text)
    print(f"\nTransport plan of {row['file_name']} ({out.alignments.shape[1]} frames x "
          f"{out.alignments.shape[2]} word pieces): {picture}")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=400, help="optimiser steps of each model")
    parser.add_argument("--utterances", type=int, default=3000, help="corpus size, if it must be built")
    args = parser.parse_args()
    start = time.time()
    build_corpus(args.utterances)
    durations = train_both(args.steps)
    report(durations)
    transcribe_and_plot()
    print(f"\ndemo done in {(time.time() - start) / 60:.1f} min")


if __name__ == "__main__":
    main()
