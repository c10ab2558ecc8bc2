"""The offline demo behind `make demo`: a speech recogniser trained on a laptop, with and without UOT transfer, each
decoded greedily and with an n-gram language model.

    python scripts/run_demo.py [--start-steps 1600] [--steps 400] [-- <more training-script flags>]

1. Builds the synthetic corpus (WordNet sentences spoken by espeak-ng) in data/demo_corpus unless it is there, and a
   small validation corpus of other sentences (data/demo_validation).
2. Trains a tiny wav2vec 2.0 from scratch with CTC alone (configs/demo.yaml, both CPU threads): the shared start,
   standing in for the pretrained encoder that real users fine-tune.
3. Fine-tunes that start twice for the same number of steps, side by side on one thread each
   (configs/demo_finetune.yaml): CTC alone, and CTC with UOT transfer from the MiniLM teacher. This is the regime
   the method is for: transfer into an acoustic model that already recognises speech. Each run also saves a 3-gram
   language model of WordNet's other sentences (never a test or validation sentence; KenLM), whose LM weight and
   word bonus it chooses on the validation corpus (the training script's --lm_text and --lm_tune_file).
4. Transcribes the test split (sentences never trained on; half of it in voices never heard) one file at a time,
   as the pipeline does, greedily and with the language model, and prints WER and CER for heard and unheard voices.
5. Prints a few test transcripts from the stock `pipeline("automatic-speech-recognition")` beside the language
   model's, and writes a picture of one test utterance's transport plan with the corpus's word timings marked
   (outputs/demo_uot/alignment.png).

Flags after `--` go to every training (e.g. `-- --per_device_train_batch_size 4`).
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LOGGING_STEPS = 25
# Fewer page faults from the allocator: steps about a quarter faster and steadier on small CPU machines.
ALLOCATOR = {"MALLOC_MMAP_THRESHOLD_": "4294967296", "MALLOC_TRIM_THRESHOLD_": "68719476736"}


def build_corpus(corpus: str, utterances: int, sentences: str | None, *options: str) -> None:
    if os.path.isfile(os.path.join(corpus, "test", "metadata.csv")):
        print(f"corpus: reusing {corpus}")
        return
    command = [sys.executable, "-m", "modeling_uot_ctc.corpus", "--output", corpus, "--utterances", str(utterances),
               "--seed", "0", *options]
    if sentences:
        command += ["--sentences", sentences]
    subprocess.run(command, cwd=REPO, check=True)


def language_model_inputs(corpus: str, validation: str, sentences: str | None, chars_to_ignore, outputs: str):
    """The language model's text and the manifest of the split its weights are chosen on.

    The text is every sentence the corpus builder draws from (WordNet's examples, or `sentences`), normalised as the
    transcripts are, less every test and validation sentence: general English text, as a LibriSpeech recipe's LM
    corpus is, that has never seen the evaluation's sentences. Returns `(text file, validation manifest)`.
    """
    from modeling_uot_ctc.corpus import clean_sentences, read_corpus, wordnet_sentences
    from modeling_uot_ctc.language_model import text_without

    if sentences:
        with open(sentences, encoding="utf-8") as handle:
            pool = clean_sentences(handle)
    else:
        pool = wordnet_sentences()
    held_out = [r["text"] for r in read_corpus(corpus, ["test"]) + read_corpus(validation)]
    text = text_without(pool, held_out, chars_to_ignore)
    text_path, manifest = os.path.join(outputs, "demo_lm_text.txt"), os.path.join(outputs, "demo_validation.jsonl")
    os.makedirs(outputs, exist_ok=True)
    with open(text_path, "w", encoding="utf-8") as handle:
        handle.write("\n".join(text) + "\n")
    with open(manifest, "w", encoding="utf-8") as handle:
        for row in read_corpus(validation):
            handle.write(json.dumps({"audio": row["path"], "text": row["text"]}) + "\n")
    return text_path, manifest


def train(runs: dict, threads: int, steps: int, outputs: str) -> None:
    """Run the training script once per entry of `runs` (name: arguments), all at once with `threads` CPU threads
    each, printing progress every 30 s."""
    env = {**os.environ, **ALLOCATOR, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
           "HF_HUB_OFFLINE": "1"}
    processes, started, logs = {}, {}, {}
    os.makedirs(outputs, exist_ok=True)
    for name, args in runs.items():
        logs[name] = os.path.join(outputs, f"{os.path.basename(args[args.index('--output_dir') + 1])}.log")
        command = [sys.executable, os.path.join(REPO, "run_speech_recognition_uot.py"), *args,
                   "--max_steps", str(steps), "--logging_steps", str(LOGGING_STEPS), "--disable_tqdm", "true"]
        started[name] = time.time()
        with open(logs[name], "w") as log:
            processes[name] = subprocess.Popen(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
        print(f"training {name}: log in {logs[name]}", flush=True)
    finished, last_report = set(), time.time()
    while len(finished) < len(processes):
        time.sleep(2)
        for name, process in processes.items():
            if name not in finished and process.poll() is not None:
                finished.add(name)
                if process.returncode != 0:
                    for other in processes.values():
                        other.kill()
                    raise SystemExit(f"training {name} failed; see {logs[name]}")
        if time.time() - last_report > 30:
            last_report = time.time()
            for name in processes:
                if name not in finished:
                    print("  " + progress(name, logs[name], steps, time.time() - started[name]), flush=True)


def progress(name: str, log_path: str, steps: int, elapsed: float) -> str:
    """`name: step, loss parts, time left`, from the Trainer's log lines (one every LOGGING_STEPS steps)."""
    logged = []
    with open(log_path, errors="replace") as handle:
        for line in handle:
            if line.startswith("{'loss'"):
                logged.append(ast.literal_eval(line.strip()))
    if not logged:
        return f"{name}: preparing ({elapsed:.0f} s)"
    step = min(len(logged) * LOGGING_STEPS, steps)
    parts = ", ".join(f"{key} {float(logged[-1][key]):.3f}" for key in ("ctc_loss", "kt_loss") if key in logged[-1])
    left = elapsed / step * (steps - step)
    return f"{name}: step {step}/{steps}, {parts}, about {left / 60:.1f} min left"


def transcribe_test_split(folder: str, corpus: str) -> tuple[list[dict], list[dict]]:
    """Every test utterance transcribed by the saved model, one file at a time (as the pipeline does: with a
    group-norm front end, padding in a batch would change the other utterances' frames), greedily and with the
    folder's language model. Returns the rows twice, with each decoding's `hypothesis`."""
    from transformers import AutoProcessor

    from modeling_uot_ctc import Wav2Vec2ForCTCWithUOT
    from modeling_uot_ctc.corpus import read_corpus
    from modeling_uot_ctc.data import SAMPLING_RATE, decode_audio
    from modeling_uot_ctc.language_model import decode, load_decoder
    from modeling_uot_ctc.transcribe import greedy, log_probs

    model = Wav2Vec2ForCTCWithUOT.from_pretrained(folder)
    processor = AutoProcessor.from_pretrained(folder)
    rows = read_corpus(corpus, ["test"])
    audio = [decode_audio(row["path"], where=row["file_name"]) for row in rows]
    scores = log_probs(model, [processor.feature_extractor(a, sampling_rate=SAMPLING_RATE).input_values[0]
                               for a in audio])
    started = time.perf_counter()
    with_lm = decode(load_decoder(folder, processor.tokenizer), scores)
    seconds = sum(len(a) for a in audio) / SAMPLING_RATE
    print(f"  {os.path.basename(folder)}: beam search with the language model at "
          f"{(time.perf_counter() - started) / seconds:.4f} s per second of audio")
    return ([{**row, "hypothesis": text} for row, text in zip(rows, greedy(processor.tokenizer, scores))],
            [{**row, "hypothesis": text} for row, text in zip(rows, with_lm)])


def scores(rows: list[dict], chars_to_ignore: list[str]) -> dict:
    """WER and CER (the project's offline jiwer modules) of all rows, of heard voices and of unheard ones."""
    import evaluate

    from modeling_uot_ctc.data import normalise_text
    from modeling_uot_ctc.metrics import METRIC_PATHS

    metrics = {name: evaluate.load(METRIC_PATHS[name]) for name in ("wer", "cer")}
    groups = {"all": rows, "heard": [r for r in rows if r["seen_voice"] == "True"],
              "unheard": [r for r in rows if r["seen_voice"] != "True"]}
    result = {}
    for group, members in groups.items():
        if not members:
            continue
        references = [normalise_text(r["text"], chars_to_ignore, True) for r in members]
        predictions = [r["hypothesis"] for r in members]
        for name, metric in metrics.items():
            result[f"{group}_{name}"] = metric.compute(predictions=predictions, references=references)
        result[f"{group}_count"] = len(members)
    return result


def training_minutes(folder: str) -> float:
    """The Trainer's own training time of a run (without start-up, preprocessing and teacher states)."""
    return json.load(open(os.path.join(folder, "train_results.json")))["train_runtime"] / 60


def report(results: dict, minutes: dict, start_minutes: float) -> None:
    any_row = next(iter(results.values()))
    heard, unheard = any_row.get("heard_count", 0), any_row.get("unheard_count", 0)
    print(f"\nTest split: {heard + unheard} sentences never trained on, {heard} in voices heard in training and "
          f"{unheard} in voices never heard. Both rows fine-tune the same CTC start ({start_minutes:.1f} min of "
          "training).")
    print(f"{'model':<10} {'decoding':<9} {'CER heard':>10} {'WER heard':>10} {'CER unheard':>12} "
          f"{'WER unheard':>12} {'fine-tuning':>12}")
    for name, row in results.items():
        model, decoding = name.split(", ")
        print(f"{model:<10} {decoding:<9} {row.get('heard_cer', float('nan')):>10.3f} "
              f"{row.get('heard_wer', float('nan')):>10.3f} {row.get('unheard_cer', float('nan')):>12.3f} "
              f"{row.get('unheard_wer', float('nan')):>12.3f} {minutes[model]:>8.1f} min")


def show_transcripts(folder: str, rows_with_lm: list[dict], corpus: str, count: int = 3) -> None:
    """A few test files through the stock pipeline (greedy), heard voices first, then unheard ones, each beside its
    beam search with the language model."""
    from transformers import pipeline

    from modeling_uot_ctc.data import decode_audio

    asr = pipeline("automatic-speech-recognition", model=folder, device=-1)
    print(f"\nThe stock pipeline on test files, from {folder}, and the same model with its language model:")
    for label, seen in (("heard voice", "True"), ("unheard voice", "False")):
        for row in [r for r in rows_with_lm if r["seen_voice"] == seen][:count]:
            audio = decode_audio(row["path"])  # an array needs no ffmpeg
            print(f"  [{label}, {row['voice']}]\n    reference: {row['text']}\n    pipeline:  {asr(audio)['text']}"
                  f"\n    with LM:   {row['hypothesis']}")


def plot_plan(folder: str, row: dict, corpus: str) -> str:
    """The UOT model's transport plan for one test utterance, with the corpus's word timings marked."""
    import torch
    from transformers import AutoProcessor

    from modeling_uot_ctc import Wav2Vec2ForCTCWithUOT
    from modeling_uot_ctc.data import SAMPLING_RATE, decode_audio
    from modeling_uot_ctc.plotting import plot_alignment
    from modeling_uot_ctc.teacher import TextTeacher

    model = Wav2Vec2ForCTCWithUOT.from_pretrained(folder).eval()
    processor = AutoProcessor.from_pretrained(folder)
    teacher = TextTeacher(model.config.teacher_name_or_path, layer=model.config.teacher_layer)
    audio = decode_audio(os.path.join(corpus, "test", row["file_name"]))
    text = row["text"].lower()
    states = teacher([text])
    with torch.no_grad():
        out = model(processor(audio, sampling_rate=SAMPLING_RATE, return_tensors="pt").input_values,
                    teacher_hidden_states=states.hidden_states, teacher_attention_mask=states.attention_mask,
                    output_alignments=True)
    frame_rate = out.alignments.shape[1] / (len(audio) / SAMPLING_RATE)
    picture = os.path.join(folder, "alignment.png")
    plot_alignment(out.alignments[0], picture, tokens=states.tokens[0], frame_rate=frame_rate, title=text,
                   word_timings=[tuple(word) for word in json.loads(row["words"])])
    print(f"\nTransport plan of {row['file_name']} ({out.alignments.shape[1]} frames x {out.alignments.shape[2]} "
          f"word pieces, spoken words marked): {picture}")
    return picture


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    extra = argv[argv.index("--") + 1 :] if "--" in argv else []
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--start-steps", type=int, default=1600, help="CTC-only steps of the shared start")
    parser.add_argument("--steps", type=int, default=400, help="fine-tuning steps of each row")
    parser.add_argument("--utterances", type=int, default=3000, help="corpus size, if it must be built")
    parser.add_argument("--corpus", default=os.path.join(REPO, "data", "demo_corpus"), help="the corpus folder")
    parser.add_argument("--sentences", help="a text file of sentences for the corpus, instead of WordNet's")
    parser.add_argument("--outputs", default=os.path.join(REPO, "outputs"), help="where the models are written")
    parser.add_argument("--validation", default=os.path.join(REPO, "data", "demo_validation"),
                        help="a second corpus of other sentences, on which the language model's weights are chosen")
    parser.add_argument("--validation-utterances", type=int, default=200, help="its size, if it must be built")
    args = parser.parse_args(argv[: argv.index("--")] if "--" in argv else argv)

    started = time.time()
    build_corpus(args.corpus, args.utterances, args.sentences)
    # Sentences neither corpus above has (the builder skips those the first one took), half of them spoken by voices
    # training never hears, as in the test split.
    build_corpus(args.validation, args.validation_utterances, args.sentences, "--skip-sentences", str(args.utterances),
                 "--test-fraction", "0.5")
    config, finetune = os.path.join(REPO, "configs", "demo.yaml"), os.path.join(REPO, "configs", "demo_finetune.yaml")
    import yaml

    chars_to_ignore = yaml.safe_load(open(config, encoding="utf-8"))["chars_to_ignore"]
    lm_text, validation_manifest = language_model_inputs(
        args.corpus, args.validation, args.sentences, chars_to_ignore, args.outputs
    )
    start_dir = os.path.join(args.outputs, "demo_start")
    common = ["--data_dir", args.corpus, *extra]

    print(f"\n1. The shared start: CTC alone from scratch, {args.start_steps} steps on two threads.")
    train({"CTC start": [config, "--aligner", "none", "--do_eval", "false", "--output_dir", start_dir, *common]},
          threads=2, steps=args.start_steps, outputs=args.outputs)

    print(f"\n2. Fine-tuning the start, {args.steps} steps each, side by side on one thread each.")
    # Each row also gets the same 3-gram language model, its weights chosen on the validation corpus.
    language_model = ["--lm_text", lm_text, "--lm_tune_file", validation_manifest,
                      "--lm_alpha_grid", "0.25", "0.5", "1.0", "--lm_beta_grid", "-1.0", "0.0", "1.0"]
    branch = [config, finetune, "--model_name_or_path", start_dir, "--tokenizer_name_or_path", start_dir,
              *language_model, *common]
    folders = {"CTC only": os.path.join(args.outputs, "demo_ctc"), "UOT-KT": os.path.join(args.outputs, "demo_uot")}
    runs = {
        "CTC only": [*branch, "--aligner", "none", "--output_dir", folders["CTC only"]],
        "UOT-KT": [*branch, "--output_dir", folders["UOT-KT"]],
    }
    train(runs, threads=1, steps=args.steps, outputs=args.outputs)

    print("\n3. Transcribing the test split, one file at a time, greedily and with the language model.")
    transcripts = {}
    for name, folder in folders.items():
        transcripts[f"{name}, greedy"], transcripts[f"{name}, with LM"] = transcribe_test_split(folder, args.corpus)
    results = {name: scores(rows, chars_to_ignore) for name, rows in transcripts.items()}
    minutes = {name: training_minutes(folder) for name, folder in folders.items()}
    report(results, minutes, training_minutes(start_dir))
    with open(os.path.join(args.outputs, "demo_results.json"), "w") as handle:
        json.dump(results, handle, indent=1)
    show_transcripts(folders["UOT-KT"], transcripts["UOT-KT, with LM"], args.corpus)
    plot_plan(folders["UOT-KT"], transcripts["UOT-KT, greedy"][0], args.corpus)
    print(f"\ndemo done in {(time.time() - started) / 60:.1f} min")
    return results


if __name__ == "__main__":
    main()
