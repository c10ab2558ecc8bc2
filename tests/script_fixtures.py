"""A tiny speech corpus and a tiny BERT teacher, made on the spot for the script's tests (nothing is downloaded)."""

import csv
import json
import os
import re

import numpy as np
import soundfile
import torch
from transformers import BertConfig, BertModel, BertTokenizerFast

SENTENCES = [
    "the air is clean",
    "i can breathe better",
    "a quiet morning",
    "the cat sat down",
    "we walk home",
    "clean water helps",
    "the sun is up",
    "she reads a book",
    "birds sing loudly",
    "open the door",
    "rain falls softly",
    "keep the light on",
]

TINY_MODEL = dict(
    hidden_size=16,
    num_hidden_layers=2,
    num_attention_heads=2,
    intermediate_size=20,
    conv_dim=[32, 32, 32],
    conv_stride=[5, 4, 4],
    conv_kernel=[10, 8, 8],
    conv_bias=True,
    num_conv_pos_embeddings=16,
    num_conv_pos_embedding_groups=2,
    feat_extract_norm="layer",
)


def speech_like(text, rng, rate=16_000):
    """Noise bursts, one per character, so that duration follows the transcript (about 70 ms a character)."""
    pieces = []
    for character in text:
        length = int(0.07 * rate)
        if character == " ":
            pieces.append(np.zeros(length, dtype=np.float32))
        else:
            tone = np.sin(2 * np.pi * (200 + 20 * (ord(character) % 26)) * np.arange(length) / rate)
            pieces.append((0.3 * tone + 0.05 * rng.standard_normal(length)).astype(np.float32))
    return np.concatenate(pieces)


def write_corpus(root, seed=0, word_timings=False):
    """An audiofolder (train/ and test/ with metadata.csv) and JSONL manifests pointing at the same files; with
    `word_timings`, a `words` column as the project's corpora write it (`speech_like` gives each character 70 ms)."""
    rng = np.random.default_rng(seed)
    splits = {"train": SENTENCES[:8], "test": SENTENCES[8:]}
    for split, sentences in splits.items():
        folder = os.path.join(root, split)
        os.makedirs(folder, exist_ok=True)
        rows = []
        for k, sentence in enumerate(sentences):
            name = f"{split}_{k:03d}.wav"
            soundfile.write(os.path.join(folder, name), speech_like(sentence, rng), 16_000)
            rows.append({"file_name": name, "text": sentence.upper() + "."})
            if word_timings:
                starts = [m.start() for m in re.finditer(r"\S+", sentence)]
                ends = [m.end() for m in re.finditer(r"\S+", sentence)]
                words = [[w, 0.07 * a, 0.07 * e] for w, a, e in zip(sentence.split(), starts, ends)]
                words[-1][0] += "."
                rows[-1]["words"] = json.dumps(words)
        with open(os.path.join(folder, "metadata.csv"), "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
        with open(os.path.join(root, f"{split}.jsonl"), "w") as handle:
            for row in rows:
                handle.write(json.dumps({"audio": os.path.join(split, row["file_name"]), "text": row["text"]}) + "\n")
    return root


def write_teacher(folder, hidden_size=24, seed=0):
    os.makedirs(folder, exist_ok=True)
    words = sorted({w for s in SENTENCES for w in s.split()})
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]
    with open(os.path.join(folder, "vocab.txt"), "w") as handle:
        handle.write("\n".join(vocab) + "\n")
    tokenizer = BertTokenizerFast(vocab=os.path.join(folder, "vocab.txt"), do_lower_case=True)
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=len(vocab), hidden_size=hidden_size, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=32,
    )
    BertModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def base_arguments(corpus, teacher, output_dir, **overrides):
    """Flags for a few CPU steps of the tiny model on the tiny corpus."""
    settings = {
        "output_dir": output_dir,
        "teacher_cache_dir": os.path.join(os.path.dirname(os.path.abspath(output_dir)), "teacher_cache"),
        "data_dir": corpus,
        "teacher_name_or_path": teacher,
        "model_config": json.dumps(TINY_MODEL),
        "eval_split_name": "test",
        "chars_to_ignore": [".", ","],
        "max_steps": 4,
        "per_device_train_batch_size": 4,
        "per_device_eval_batch_size": 4,
        "learning_rate": 1e-3,
        "warmup_steps": 0,
        "logging_steps": 1,
        "save_strategy": "no",
        "report_to": "none",
        "seed": 0,
        "mask_time_prob": 0.0,
        "dataloader_num_workers": 0,
    }
    settings.update(overrides)
    argv = ["--do_train", "--do_eval", "--use_cpu"]
    for key, value in settings.items():
        if value is None:
            continue
        if isinstance(value, list):
            argv += [f"--{key}", *map(str, value)]
        elif isinstance(value, bool):
            argv += [f"--{key}", str(value)]
        else:
            argv += [f"--{key}", str(value)]
    return argv
