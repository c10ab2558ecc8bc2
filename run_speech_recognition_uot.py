#!/usr/bin/env python
"""Fine-tune a wav2vec 2.0 CTC model with UOT knowledge transfer from a pretrained language model.

A drop-in relative of transformers' `run_speech_recognition_ctc.py`: the same arguments in their transformers 5.x
spelling, plus a teacher and the transfer settings. Flags, or JSON/YAML files (each overriding the one before)
followed by flags that override them:

    python run_speech_recognition_uot.py configs/demo.yaml --max_steps 100
    python run_speech_recognition_uot.py configs/demo.yaml configs/ablation_ot.yaml
    accelerate launch --num_processes 2 run_speech_recognition_uot.py configs/librispeech_clean100.yaml

Data: a hub dataset (`--dataset_name`), a local `audiofolder` (`--data_dir`), or CSV/JSONL manifests
(`--train_file`, `--eval_file`) with an audio path column (relative paths are read from the manifest's folder)
and a text column. Audio is decoded with soundfile and resampled with soxr; torchcodec is not needed.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass, field
from typing import Any, Optional

import datasets
import evaluate
import numpy as np
import torch
import yaml
from transformers import (
    AutoFeatureExtractor,
    AutoTokenizer,
    HfArgumentParser,
    Trainer,
    TrainerCallback,
    TrainingArguments,
    Wav2Vec2CTCTokenizer,
    Wav2Vec2FeatureExtractor,
    Wav2Vec2Processor,
    set_seed,
)
from transformers.trainer_utils import get_last_checkpoint
from transformers.utils import logging as hf_logging

from modeling_uot_ctc import Wav2Vec2ForCTCWithUOT, Wav2Vec2UOTConfig
from modeling_uot_ctc.data import (
    SAMPLING_RATE,
    InvalidExample,
    decode_audio,
    frame_timing,
    normalise_text,
    token_characters,
    token_frame_spans,
)
from modeling_uot_ctc.homophone_accuracy import homophone_accuracy
from modeling_uot_ctc.language_model import (
    ALPHABET_FILE,
    LANGUAGE_MODEL_DIR,
    build_language_model,
    choose_weights,
    find_kenlm_tool,
    has_language_model,
    store_weights,
)
from modeling_uot_ctc.language_model import decode as decode_with_language_model
from modeling_uot_ctc.metrics import METRIC_PATHS
from modeling_uot_ctc.teacher import DEFAULT_TEACHER_NAME, TeacherStateCache, TextTeacher, teacher_source
from modeling_uot_ctc.transcribe import greedy
from modeling_uot_ctc.transcribe import log_probs as transcription_log_probs
from modeling_uot_ctc.word_pieces import WordPieceUnits, anchor_units, is_word_piece_vocabulary, word_piece_vocabulary

logger = hf_logging.get_logger(__name__)


# ----------------------------------------------------------------------------------------------------- arguments


@dataclass
class ModelArguments:
    """The acoustic model: a pretrained wav2vec 2.0 checkpoint, or an architecture trained from scratch."""

    model_name_or_path: Optional[str] = field(
        default=None,
        metadata={"help": "Pretrained wav2vec 2.0 (Wav2Vec2Model, Wav2Vec2ForCTC or a UOT model), e.g. "
                  "facebook/wav2vec2-base. Leave empty to train from scratch with `model_config`."},
    )
    model_config: Optional[str] = field(
        default=None,
        metadata={"help": "Wav2Vec2Config fields for a model trained from scratch (a JSON string on the command "
                  "line, a mapping in a config file), e.g. hidden_size, num_hidden_layers, conv_dim."},
    )
    tokenizer_name_or_path: Optional[str] = field(
        default=None, metadata={"help": "An existing CTC tokenizer; default: a character vocabulary built from the data."}
    )
    model_revision: str = field(
        default="main", metadata={"help": "Branch, tag or commit of the checkpoint and its feature extractor."}
    )
    cache_dir: Optional[str] = field(
        default=None, metadata={"help": "Where hub downloads (checkpoint, teacher, tokenizer, dataset) are stored."}
    )
    freeze_feature_encoder: bool = field(default=True, metadata={"help": "Freeze the convolutional feature encoder."})
    attention_dropout: float = field(default=0.0, metadata={"help": "Dropout on attention probabilities."})
    activation_dropout: float = field(default=0.0, metadata={"help": "Dropout inside the feed-forward layers."})
    feat_proj_dropout: float = field(default=0.0, metadata={"help": "Dropout after the feature projection."})
    hidden_dropout: float = field(default=0.0, metadata={"help": "Dropout on hidden states."})
    final_dropout: float = field(default=0.0, metadata={"help": "Dropout before the CTC head."})
    mask_time_prob: float = field(default=0.05, metadata={"help": "SpecAugment: fraction of time steps masked."})
    mask_time_length: int = field(default=10, metadata={"help": "SpecAugment: length of each time mask."})
    mask_feature_prob: float = field(default=0.0, metadata={"help": "SpecAugment: fraction of channels masked."})
    mask_feature_length: int = field(default=10, metadata={"help": "SpecAugment: length of each channel mask."})
    layerdrop: float = field(default=0.0, metadata={"help": "Probability of dropping a whole encoder layer."})
    ctc_loss_reduction: str = field(default="mean", metadata={"help": "'mean' or 'sum' reduction of the CTC loss."})
    ctc_zero_infinity: bool = field(default=False, metadata={"help": "Zero infinite CTC losses (impossible labels)."})
    add_adapter: bool = field(default=False, metadata={"help": "Add wav2vec2's convolutional output adapter."})
    plain_model_dir: Optional[str] = field(
        default=None,
        metadata={"help": "Also save the trained model here as a stock Wav2Vec2ForCTC checkpoint (model_type "
                  "wav2vec2, no adapter, with the processor and a model card): it loads wherever transformers does, "
                  "with no custom code and no trust_remote_code."},
    )
    plain_hub_model_id: Optional[str] = field(
        default=None,
        metadata={"help": "Push the plain checkpoint of plain_model_dir to this Hub repository (with --hub_token or "
                  "the stored login; private when --hub_private_repo)."},
    )


@dataclass
class DataTrainingArguments:
    """Which audio and transcripts to train and evaluate on, and how to clean them."""

    dataset_name: Optional[str] = field(default=None, metadata={"help": "A dataset on the hub (or a local script)."})
    dataset_config_name: Optional[str] = field(default=None, metadata={"help": "Its configuration name."})
    data_dir: Optional[str] = field(default=None, metadata={"help": "A local `audiofolder` (metadata.csv/jsonl)."})
    train_file: Optional[str] = field(default=None, metadata={"help": "A CSV or JSONL manifest for training."})
    eval_file: Optional[str] = field(default=None, metadata={"help": "A CSV or JSONL manifest for evaluation."})
    train_split_name: str = field(
        default="train", metadata={"help": "Training split; a slice such as `train[:500]` works."}
    )
    eval_split_name: str = field(default="test", metadata={"help": "Evaluation split."})
    audio_column_name: str = field(default="audio", metadata={"help": "Column with the audio (or its path)."})
    text_column_name: str = field(default="text", metadata={"help": "Column with the transcript."})
    chars_to_ignore: Optional[list[str]] = field(
        default=None, metadata={"help": "Characters removed from transcripts, e.g. , ? . ! - ; : \" '"}
    )
    do_lower_case: bool = field(default=True, metadata={"help": "Lower-case transcripts."})
    eval_metrics: list[str] = field(default_factory=lambda: ["wer", "cer"], metadata={"help": "'wer' and/or 'cer'."})
    max_duration_in_seconds: float = field(default=20.0, metadata={"help": "Drop longer utterances."})
    min_duration_in_seconds: float = field(default=0.0, metadata={"help": "Drop shorter utterances."})
    max_train_samples: Optional[int] = field(default=None, metadata={"help": "Keep only this many training rows."})
    max_eval_samples: Optional[int] = field(default=None, metadata={"help": "Keep only this many evaluation rows."})
    preprocessing_only: bool = field(default=False, metadata={"help": "Preprocess, cache, and stop."})
    preprocessing_num_workers: Optional[int] = field(default=None, metadata={"help": "Processes for preprocessing."})
    unk_token: str = field(default="[UNK]", metadata={"help": "Unknown token of a built vocabulary."})
    pad_token: str = field(default="[PAD]", metadata={"help": "Padding token, also the CTC blank."})
    word_delimiter_token: str = field(default="|", metadata={"help": "Stands for the space between words."})
    output_units: str = field(
        default="characters",
        metadata={"help": "Units of a built vocabulary: 'characters', or 'word_pieces': the teacher's WordPiece "
                  "tokens (the most frequent of the training text, and every character), so that the CTC head "
                  "writes the units the teacher reads (modeling_uot_ctc/word_pieces.py). The export's tokenizer is "
                  "the stock Wav2Vec2CTCTokenizer either way."},
    )
    word_piece_vocab_size: int = field(
        default=1000,
        metadata={"help": "Entries of a word-piece vocabulary, special tokens and the training text's characters "
                  "included (a character only the evaluation text has comes on top)."},
    )
    invalid_data: str = field(
        default="skip",
        metadata={"help": "What to do with an unreadable or truncated audio file, an empty transcript, characters "
                  "outside the vocabulary or a transcript longer than its audio allows: 'skip' (counted, with a "
                  "warning) or 'error' (stop, naming the file or row)."},
    )
    resample: bool = field(
        default=True,
        metadata={"help": "Resample audio at another rate to 16 kHz with soxr; when false such audio is invalid."},
    )
    overwrite_cache: bool = field(default=False, metadata={"help": "Redo preprocessing instead of reusing its cache."})
    token: Optional[str] = field(
        default=None,
        metadata={"help": "Hub token for private or gated datasets, checkpoints and teachers (default: the stored "
                  "login)."},
    )
    trust_remote_code: bool = field(
        default=False,
        metadata={"help": "Allow hub tokenizers, feature extractors and teachers that ship their own code."},
    )
    phoneme_language: Optional[str] = field(
        default=None, metadata={"help": "Phoneme targets, as upstream; not supported here (an error says so)."}
    )


@dataclass
class TransferArguments:
    """The teacher and the UOT transfer (see Wav2Vec2UOTConfig for the meaning of each setting)."""

    teacher_name_or_path: Optional[str] = field(
        default=None, metadata={"help": "BERT-family teacher, e.g. bert-base-uncased; default the offline MiniLM."}
    )
    teacher_revision: Optional[str] = field(
        default=None, metadata={"help": "Branch, tag or commit of a hub teacher (default: its main branch)."}
    )
    teacher_layer: int = field(default=-1, metadata={"help": "Teacher layer whose states are used (-1: last)."})
    teacher_cache_dir: Optional[str] = field(
        default=None,
        metadata={"help": "Where teacher states are cached; default $XDG_CACHE_HOME/uot-asr/teacher_states (outside "
                  "the output folder, which is what gets pushed)."},
    )
    teacher_on_the_fly: bool = field(
        default=False, metadata={"help": "Compute teacher states in each batch instead of caching them once."}
    )
    aligner: str = field(
        default="uot",
        metadata={"help": "'uot', 'ot', 'none' (plain CTC), or the controls 'diagonal' and 'oracle' (pools each token "
                  "from its word's frames; needs a `words` column of word timings, as the project's corpora have)."},
    )
    alignment_eps: float = field(default=0.1, metadata={"help": "Entropic regularisation of the alignment."})
    rho_frames: Optional[float] = field(default=1.0, metadata={"help": "Frame-side relaxation (degree of matching)."})
    rho_tokens: Optional[float] = field(default=None, metadata={"help": "Token-side relaxation; empty = hard."})
    matching_fraction: Optional[float] = field(
        default=None, metadata={"help": "rho_frames given as rho / (rho + eps) in (0, 1]."}
    )
    temporal_order_weight: float = field(default=0.0, metadata={"help": "Weight of the temporal-order prior."})
    alignment_anchor_weight: float = field(
        default=0.0, metadata={"help": "Share of the CTC-posterior anchor in the alignment cost, in [0, 1]."}
    )
    alignment_anchor_gradient: bool = field(
        default=False, metadata={"help": "Let the transfer's gradient reach the CTC head through the anchor."}
    )
    alignment_cost_scale: str = field(
        default="none", metadata={"help": "'std': eps in units of each example's cost spread; 'none'."}
    )
    teacher_centering: str = field(
        default="none", metadata={"help": "'utterance': subtract each utterance's mean teacher state; 'none'."}
    )
    alignment_max_iter: int = field(default=200, metadata={"help": "Solver iterations per batch at most."})
    alignment_tol: float = field(
        default=1e-4, metadata={"help": "Solver tolerance: the mass one iteration moves, beyond float rounding."}
    )
    alignment_grad_mode: str = field(default="detach", metadata={"help": "'detach' or 'unrolled'."})
    kt_weight: float = field(default=0.5, metadata={"help": "Weight of the transfer loss."})
    kt_loss_type: str = field(
        default="cosine", metadata={"help": "'cosine', 'cosine+transport', 'infonce' or 'cosine+infonce'."}
    )
    kt_temperature: float = field(default=0.1, metadata={"help": "Temperature of the contrastive loss."})
    kt_warmup_steps: int = field(default=0, metadata={"help": "Optimiser steps of CTC alone first."})
    kt_ramp_steps: int = field(
        default=0, metadata={"help": "Steps after the warm-up over which the transfer's weight grows to kt_weight."}
    )
    kt_adapter: str = field(default="linear", metadata={"help": "'linear' or 'mlp'."})
    kt_encoder_layer: int = field(default=-1, metadata={"help": "Encoder layer feeding the adapter."})
    kt_cuda_graphs: bool = field(
        default=False,
        metadata={"help": "On a CUDA device, replay the transfer from captured CUDA graphs (faster steps; the solver "
                  "then runs exactly alignment_graph_iterations iterations)."},
    )
    alignment_graph_iterations: int = field(
        default=8, metadata={"help": "Solver iterations inside the CUDA graphs (see kt_cuda_graphs)."}
    )
    plan_picture_every: int = field(
        default=10,
        metadata={"help": "Every this many logging steps, draw the transport plan of the first evaluation utterance "
                  "(else the first training one) into TensorBoard (tag transfer/plan), when report_to includes "
                  "tensorboard; 0: never."},
    )


# TransferArguments that steer the script, not the model: they stay out of its config.
SCRIPT_ONLY_TRANSFER_ARGUMENTS = ("plan_picture_every",)


@dataclass
class DecodingArguments:
    """An n-gram language model for beam-search decoding beside greedy decoding (KenLM's estimator, pyctcdecode's
    beam search; see modeling_uot_ctc.language_model)."""

    lm_text: Optional[str] = field(
        default=None,
        metadata={"help": "Text for an n-gram language model saved with the model (alphabet.json and "
                  "language_model/, the Hub's layout): a file with one sentence a line, normalised like the "
                  "transcripts, or 'train' for the training transcripts. Never evaluation sentences. The evaluation "
                  "then reports eval_wer_lm and eval_cer_lm beside the greedy figures."},
    )
    lm_order: int = field(default=3, metadata={"help": "Order of the n-gram model."})
    lm_alpha: float = field(default=0.5, metadata={"help": "Weight of the language model in the beam search."})
    lm_beta: float = field(default=1.0, metadata={"help": "Bonus per word in the beam search."})
    lm_beam_width: int = field(default=32, metadata={"help": "Beams kept by the search."})
    lm_tune_split_name: Optional[str] = field(
        default=None,
        metadata={"help": "A validation split (of --dataset_name or --data_dir) on which lm_alpha and lm_beta are "
                  "chosen from the grids below by WER before the evaluation; never the evaluation split."},
    )
    lm_tune_file: Optional[str] = field(
        default=None,
        metadata={"help": "The same as a CSV or JSONL manifest (audio and text columns), whatever the training and "
                  "evaluation data come from."},
    )
    lm_alpha_grid: list[float] = field(
        default_factory=lambda: [0.25, 0.5, 1.0, 1.5], metadata={"help": "lm_alpha values tried."}
    )
    lm_beta_grid: list[float] = field(
        default_factory=lambda: [-1.0, 0.0, 1.0, 2.0], metadata={"help": "lm_beta values tried."}
    )


def parse_arguments(argv: list[str]):
    """Config files (JSON or YAML) first, each overriding the one before, then flags, which override them all."""
    parser = HfArgumentParser(
        (ModelArguments, DataTrainingArguments, TransferArguments, DecodingArguments, TrainingArguments)
    )
    known = {action.dest for action in parser._actions}
    from_files = {}
    while argv and argv[0].endswith((".json", ".yaml", ".yml")):
        with open(argv[0], encoding="utf-8") as handle:
            settings = (yaml.safe_load if argv[0].endswith((".yaml", ".yml")) else json.load)(handle) or {}
        unknown = sorted(set(settings) - known)
        if unknown:
            raise ValueError(f"{argv[0]}: unknown arguments {unknown}.")
        from_files.update(settings)
        argv = argv[1:]
    parser.set_defaults(**{k: _as_cli_default(v) for k, v in from_files.items()})
    model_args, data_args, transfer_args, decoding_args, training_args = parser.parse_args_into_dataclasses(args=argv)
    if isinstance(model_args.model_config, str):
        model_args.model_config = json.loads(model_args.model_config)
    return model_args, data_args, transfer_args, decoding_args, training_args


def _as_cli_default(value):
    # argparse keeps defaults as given; dict-valued fields are parsed from JSON strings on the command line.
    return json.dumps(value) if isinstance(value, dict) else value


# ---------------------------------------------------------------------------------------------------------- data


def load_raw_datasets(
    data_args: DataTrainingArguments,
    training_args: TrainingArguments,
    cache_dir: Optional[str] = None,
    decoding_args: Optional[DecodingArguments] = None,
) -> datasets.DatasetDict:
    """Load train and eval splits (and the language model's tuning split, `lm_tune`, when one is named) with their
    audio left undecoded (bytes or paths), whatever the source."""
    splits = {}
    tune_split = decoding_args.lm_tune_split_name if decoding_args else None
    tune_file = decoding_args.lm_tune_file if decoding_args else None
    wanted = {"train": training_args.do_train, "eval": training_args.do_eval, "lm_tune": bool(tune_split)}
    if tune_file:  # a manifest, whatever the other splits come from
        splits["lm_tune"] = load_manifest(tune_file, data_args)
    if data_args.train_file or data_args.eval_file:
        files = {"train": data_args.train_file, "eval": data_args.eval_file}
        for split, path in files.items():
            if wanted[split] and path:
                splits[split] = load_manifest(path, data_args)
    elif data_args.dataset_name or data_args.data_dir:
        names = {"train": data_args.train_split_name, "eval": data_args.eval_split_name, "lm_tune": tune_split}
        for split, name in names.items():
            if not wanted[split] or name is None:
                continue
            if data_args.dataset_name:
                splits[split] = datasets.load_dataset(
                    data_args.dataset_name, data_args.dataset_config_name, split=name, cache_dir=cache_dir,
                    token=data_args.token,
                )
            else:
                splits[split] = load_audiofolder_split(data_args.data_dir, name, data_args)
    else:
        raise ValueError("No data: give --dataset_name, --data_dir, or --train_file / --eval_file.")
    for split, dataset in splits.items():
        for column in (data_args.audio_column_name, data_args.text_column_name):
            if column not in dataset.column_names:
                raise ValueError(
                    f"The {split} data has no column {column!r} (columns: {', '.join(dataset.column_names)}); "
                    f"set --{'audio' if column == data_args.audio_column_name else 'text'}_column_name."
                )
        features = dataset.features.get(data_args.audio_column_name)
        if isinstance(features, datasets.Audio) and features.decode:
            dataset = dataset.cast_column(data_args.audio_column_name, datasets.Audio(decode=False))
        limit = data_args.max_train_samples if split == "train" else data_args.max_eval_samples
        if limit is not None:
            dataset = dataset.select(range(min(limit, len(dataset))))
        splits[split] = dataset
    return datasets.DatasetDict(splits)


def load_manifest(path: str, data_args: DataTrainingArguments, audio_column: Optional[str] = None) -> datasets.Dataset:
    """A CSV or JSONL manifest; relative audio paths are resolved against the manifest's folder."""
    kind = "csv" if path.endswith(".csv") else "json"
    dataset = datasets.load_dataset(kind, data_files=path, split="train")
    root = os.path.dirname(os.path.abspath(path))
    column = audio_column or data_args.audio_column_name
    if column in dataset.column_names:
        dataset = dataset.map(
            lambda row: {column: row[column] if os.path.isabs(str(row[column])) else os.path.join(root, row[column])}
        )
    return dataset


def load_audiofolder_split(data_dir: str, split: str, data_args: DataTrainingArguments) -> datasets.Dataset:
    """One split of an `audiofolder` layout: `<data_dir>/<split>/metadata.csv` (or `.jsonl`) with a `file_name`
    column next to the audio files.

    Read as a manifest rather than through `datasets`' audiofolder builder, which needs torchcodec even to index
    the files.
    """
    folder = os.path.join(data_dir, split)
    for name in ("metadata.csv", "metadata.jsonl"):
        if os.path.isfile(os.path.join(folder, name)):
            dataset = load_manifest(os.path.join(folder, name), data_args, audio_column="file_name")
            if data_args.audio_column_name != "file_name":
                dataset = dataset.rename_column("file_name", data_args.audio_column_name)
            return dataset
    raise FileNotFoundError(f"No metadata.csv or metadata.jsonl in {folder} (audiofolder layout: one folder per split).")


def build_tokenizer(
    raw: datasets.DatasetDict, model_args, data_args, transfer_args, output_dir: str
) -> Wav2Vec2CTCTokenizer:
    """An existing CTC tokenizer, or a vocabulary of the normalised training and evaluation text: its characters,
    or (`--output_units word_pieces`) the teacher's word pieces of the training text and those characters."""
    if model_args.tokenizer_name_or_path:
        return AutoTokenizer.from_pretrained(
            model_args.tokenizer_name_or_path, cache_dir=model_args.cache_dir, token=data_args.token,
            trust_remote_code=data_args.trust_remote_code,
        )
    special = dict(pad_token=data_args.pad_token, unk_token=data_args.unk_token,
                   word_delimiter_token=data_args.word_delimiter_token)
    # Not from the language model's tuning split, which the model never learns from.
    texts = [text for split in ("train", "eval") if split in raw for text in raw[split]["normalised_text"]]
    if data_args.output_units == "word_pieces":
        if "train" not in raw:
            raise ValueError("--output_units word_pieces builds its units from the training text: give a training "
                             "split, or the tokenizer of a trained model (--tokenizer_name_or_path).")
        pieces = AutoTokenizer.from_pretrained(
            teacher_source(transfer_args.teacher_name_or_path, transfer_args.teacher_revision),
            revision=transfer_args.teacher_revision, cache_dir=model_args.cache_dir, token=data_args.token,
            trust_remote_code=data_args.trust_remote_code,
        )
        # Pieces of the training text only: which words are units must not depend on the test sentences.
        vocab = word_piece_vocabulary(raw["train"]["normalised_text"], pieces, data_args.word_piece_vocab_size,
                                      **special)
    elif data_args.output_units == "characters":
        vocab = {data_args.pad_token: 0, data_args.unk_token: 1, data_args.word_delimiter_token: 2}
    else:
        raise ValueError(f"--output_units must be 'characters' or 'word_pieces', got {data_args.output_units!r}.")
    for character in sorted({c for text in texts for c in text if c != " "}):
        vocab.setdefault(character, len(vocab))  # every character of both splits, so that both stay spellable
    os.makedirs(output_dir, exist_ok=True)
    vocab_file = os.path.join(output_dir, "vocab.json")
    with open(vocab_file, "w", encoding="utf-8") as handle:
        json.dump(vocab, handle, ensure_ascii=False)
    return Wav2Vec2CTCTokenizer(
        vocab_file,
        unk_token=data_args.unk_token,
        pad_token=data_args.pad_token,
        word_delimiter_token=data_args.word_delimiter_token,
        bos_token=None,
        eos_token=None,
    )


def preprocess(raw, tokenizer, feature_extractor, frames_for, data_args, training_args) -> datasets.DatasetDict:
    """Decode audio, encode labels and check every example; invalid ones stop the run or are skipped and counted."""
    known = set(tokenizer.get_vocab())
    delimiter = data_args.word_delimiter_token
    # The stock tokenizer splits text on multi-character entries and strips the spaces around them, losing the
    # word delimiters CTC has to write; a word-piece vocabulary is encoded word by word instead.
    if is_word_piece_vocabulary(tokenizer):
        encode = WordPieceUnits.from_tokenizer(tokenizer).encode
    else:
        encode = lambda text: tokenizer(text).input_ids  # noqa: E731

    # Word timings, where the corpus has them (the project's corpora do): the oracle aligner and the padding
    # diagnostic read them.
    timed = {split: "words" in dataset.column_names for split, dataset in raw.items()}

    def prepare(row, index):
        where = _describe_row(row, index, data_args.audio_column_name)
        try:
            text = row["normalised_text"]
            if not text:
                raise InvalidExample(f"{where}: the transcript is empty after normalisation.")
            outside = sorted({c for c in text.replace(" ", delimiter) if c not in known})
            if outside:
                raise InvalidExample(f"{where}: characters outside the vocabulary: {''.join(outside)!r}.")
            samples = decode_audio(row[data_args.audio_column_name], data_args.resample, where)
            labels = encode(text)
            frames = frames_for(len(samples))
            # CTC needs a frame per label, and a blank between two equal neighbours.
            needed = len(labels) + sum(a == b for a, b in zip(labels, labels[1:]))
            if needed > frames:
                raise InvalidExample(f"{where}: {len(labels)} labels need {needed} frames, the audio gives {frames}.")
        except InvalidExample as problem:
            if data_args.invalid_data == "error":
                raise
            empty = np.zeros(0, dtype=np.float32)
            return {"input_values": empty, "input_length": 0, "labels": [], "invalid": str(problem)}
        values = feature_extractor(samples, sampling_rate=SAMPLING_RATE).input_values[0]
        return {"input_values": values, "input_length": len(samples), "labels": labels, "invalid": ""}

    processed = {}
    for split, dataset in raw.items():
        keep_columns = {"normalised_text", "words"} if timed[split] else {"normalised_text"}
        keep_columns.add("homophones")  # the marked homophone words of a homophone corpus, where it has them
        with training_args.main_process_first(desc=f"preprocess {split}"):
            mapped = dataset.map(
                prepare,
                with_indices=True,
                load_from_cache_file=not data_args.overwrite_cache,
                remove_columns=[c for c in dataset.column_names if c not in keep_columns],
                num_proc=data_args.preprocessing_num_workers,
                desc=f"preprocess {split}",
            )
        problems = [p for p in mapped["invalid"] if p]
        if problems:
            logger.warning(
                f"{split}: skipped {len(problems)} invalid example(s) of {len(mapped)} (--invalid_data skip). "
                f"First: {problems[0]}"
            )
        mapped = mapped.filter(lambda invalid: not invalid, input_columns=["invalid"]).remove_columns("invalid")
        low, high = data_args.min_duration_in_seconds * SAMPLING_RATE, data_args.max_duration_in_seconds * SAMPLING_RATE
        before = len(mapped)
        mapped = mapped.filter(lambda n: low <= n <= high, input_columns=["input_length"])
        if len(mapped) < before:
            logger.info(f"{split}: dropped {before - len(mapped)} example(s) outside the duration limits.")
        if len(mapped) == 0:
            raise ValueError(f"No usable {split} example is left; see the warnings above.")
        processed[split] = mapped
    return datasets.DatasetDict(processed)


def _describe_row(row, index, audio_column) -> str:
    value = row.get(audio_column)
    path = value.get("path") if isinstance(value, dict) else value if isinstance(value, str) else None
    return f"row {index}" + (f" ({path})" if path else "")


@dataclass
class DataCollatorCTCWithTeacher:
    """Pads audio and labels like the upstream CTC collator and adds the teacher's states of each transcript.

    When the feature extractor gives no attention mask (wav2vec2-base and other group-norm encoders, pretrained on
    unmasked input), the batch carries `input_lengths` instead, so that the model's losses still know where each
    utterance ends.
    """

    processor: Wav2Vec2Processor
    teacher_states: Any = None  # a TeacherStateCache or a TextTeacher (on the fly), or None: no transfer inputs
    # The encoder's `(hop, first_centre)` (`modeling_uot_ctc.data.frame_timing`): with it, examples that carry word
    # timings (a `words` column) get each teacher token's word span in frames, `token_frame_spans`.
    frame_timing: Optional[tuple] = None

    def __post_init__(self):
        # The anchor reads, for each teacher piece, the posteriors of the units that spell it: its characters, or
        # with a word-piece vocabulary the piece itself where it is a unit.
        self._units_of = anchor_units(self.processor.tokenizer)

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        audio = [{"input_values": f["input_values"]} for f in features]
        labels = [{"input_ids": f["labels"]} for f in features]
        batch = self.processor.feature_extractor.pad(audio, padding=True, return_tensors="pt")
        if "attention_mask" not in batch:
            batch["input_lengths"] = torch.tensor([len(f["input_values"]) for f in features])
        label_batch = self.processor.tokenizer.pad(labels, padding=True, return_tensors="pt")
        batch["labels"] = label_batch["input_ids"].masked_fill(label_batch["attention_mask"].ne(1), -100)
        if self.teacher_states is not None:
            teacher = self.teacher_states([f["normalised_text"] for f in features])
            batch["teacher_hidden_states"] = teacher.hidden_states
            batch["teacher_attention_mask"] = teacher.attention_mask
            n_tokens = teacher.hidden_states.shape[1]
            vocab = self.processor.tokenizer.get_vocab()
            batch["teacher_token_characters"] = token_characters(teacher.tokens, vocab, n_tokens, self._units_of)
            if self.frame_timing is not None and all("words" in f for f in features):
                texts = [f["normalised_text"] for f in features]
                words = [json.loads(f["words"]) if f["words"] else None for f in features]
                batch["token_frame_spans"] = token_frame_spans(
                    texts, teacher.tokens, words, *self.frame_timing, n_tokens
                )
        return batch


# ------------------------------------------------------------------------------------------------------ training


class UOTTrainer(Trainer):
    """The Trainer, logging the CTC loss, the transfer loss and the alignment diagnostics separately.

    Args (beyond the Trainer's):
        eval_data_collator: the collator of evaluation and prediction batches. Default: the training collator
            without teacher states, when it is a `DataCollatorCTCWithTeacher`, else the training collator.
        model_card_writer: called instead of the Trainer's model card, on the main process only.
    """

    LOGGED = (
        "ctc_loss", "kt_loss", "token_coverage", "dropped_frame_fraction", "transported_mass", "alignment_converged",
        "token_discrimination", "cost_spread_over_eps", "frames_per_token", "padding_mass",
    )

    def __init__(self, *args, eval_data_collator=None, model_card_writer=None, **kwargs):
        super().__init__(*args, **kwargs)
        # The losses are per-batch means: the Trainer divides them by the accumulation steps itself.
        self.model_accepts_loss_kwargs = False
        self._sums = {}
        self._model_card_writer = model_card_writer
        if eval_data_collator is None and isinstance(self.data_collator, DataCollatorCTCWithTeacher):
            eval_data_collator = dataclasses.replace(self.data_collator, teacher_states=None)
        self.eval_data_collator = eval_data_collator or self.data_collator

    # Evaluation measures the model users will run, a plain CTC model: its batches carry no teacher states, so
    # neither the teacher nor the solver runs and `eval_loss` is the CTC loss, comparable with a CTC-only run.
    def get_eval_dataloader(self, eval_dataset=None):
        return self._with_eval_collator(super().get_eval_dataloader, eval_dataset)

    def get_test_dataloader(self, test_dataset):
        return self._with_eval_collator(super().get_test_dataloader, test_dataset)

    def _with_eval_collator(self, make_loader, dataset):
        training_collator, self.data_collator = self.data_collator, self.eval_data_collator
        try:
            return make_loader(dataset)
        finally:
            self.data_collator = training_collator

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        # The transfer's schedule at this optimiser step (restored with the state when resuming).
        scale = self.accelerator.unwrap_model(model).transfer_scale(self.state.global_step)
        inputs = {**inputs, "transfer_scale": scale}
        loss, outputs = super().compute_loss(model, inputs, return_outputs=True)
        if model.training:
            for name in self.LOGGED:
                value = getattr(outputs, name, None)
                if value is not None:
                    # A diagnostic can be undefined in a batch (NaN: `padding_mass` without word timings); it is
                    # left out of the mean on the device, without reading it back.
                    value = value.detach().float()
                    defined = ~value.isnan()
                    total, count = self._sums.get(name, (0.0, 0.0))
                    self._sums[name] = (total + torch.where(defined, value, 0.0), count + defined.float())
        return (loss, outputs) if return_outputs else loss

    def log(self, logs: dict, start_time: Optional[float] = None) -> None:
        if "loss" in logs and self._sums:
            for name, (total, count) in self._sums.items():
                # Sums over processes, then the mean: a process without a defined value adds nothing.
                total = self.accelerator.reduce(torch.as_tensor(total, dtype=torch.float32), reduction="sum")
                count = self.accelerator.reduce(torch.as_tensor(count, dtype=torch.float32), reduction="sum")
                if float(count) > 0:
                    logs[name] = round(float(total / count), 6)
            self._sums = {}
        super().log(logs, start_time)

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        loss, logits, labels = super().prediction_step(model, inputs, prediction_loss_only, ignore_keys=ignore_keys)
        if "attention_mask" in inputs:
            lengths = inputs["attention_mask"].sum(-1)
        else:
            lengths = inputs.get("input_lengths")
        if logits is not None and lengths is not None:
            unwrapped = self.accelerator.unwrap_model(model)
            first = logits[0] if isinstance(logits, tuple) else logits
            first = blank_padding_frames(first, lengths, unwrapped)
            logits = (first, *logits[1:]) if isinstance(logits, tuple) else first
        return loss, logits, labels

    def create_model_card(self, *args, **kwargs):
        if self._model_card_writer is not None and self.is_world_process_zero():
            self._model_card_writer()
        elif self._model_card_writer is None:
            super().create_model_card(*args, **kwargs)


class PlanPictureCallback(TrainerCallback):
    """Every `every` logging steps, the transport plan of one fixed utterance, drawn by
    `modeling_uot_ctc.plotting.plot_alignment`, as an image in TensorBoard (tag `transfer/plan`, through the
    Trainer's own TensorBoard writer) and as `<output_dir>/plans/step-<N>.png`, on the main process.

    Args:
        batch: the utterance as the training collator makes it (with its teacher states).
        tokens: the teacher's word pieces of its transcript (the picture's labels).
        every: logging steps between two pictures.
        tensorboard: the Trainer's `TensorBoardCallback`, whose writer exists once training starts.
    """

    def __init__(self, batch: dict, tokens: list, every: int, tensorboard):
        self.batch, self.tokens, self.every, self.tensorboard = batch, tokens, every, tensorboard
        self.logged = 0

    def on_log(self, args, state, control, model=None, logs=None, **kwargs):
        if not state.is_world_process_zero or "loss" not in (logs or {}):
            return
        self.logged += 1
        writer = getattr(self.tensorboard, "tb_writer", None)
        if self.logged % self.every or writer is None:
            return
        training = model.training
        model.eval()
        try:
            with torch.no_grad():
                batch = {k: v.to(model.device) for k, v in self.batch.items() if isinstance(v, torch.Tensor)}
                plans = model(**batch, output_alignments=True).alignments
        finally:
            model.train(training)
        if plans is None:  # the transfer did not run (a warm-up, or no teacher)
            return
        from PIL import Image

        from modeling_uot_ctc.plotting import plot_alignment

        # One utterance, so no padding: the plan is all of it. Drawn through a file, which is all `plot_alignment`
        # writes, and kept only in the event file.
        with tempfile.TemporaryDirectory() as folder:
            path = os.path.join(folder, "plan.png")
            plot_alignment(plans[0], path, tokens=self.tokens, title=f"transport plan at step {state.global_step}")
            image = np.asarray(Image.open(path).convert("RGB"))
        writer.add_image("transfer/plan", image, state.global_step, dataformats="HWC")
        writer.flush()


def blank_padding_frames(logits: torch.Tensor, input_lengths: torch.Tensor, model) -> torch.Tensor:
    """Make the frames past each utterance's end (`input_lengths` samples) predict the blank, which decoding drops.

    In a padded batch those frames can emit characters that the utterance decoded on its own would not have, so a
    batched evaluation would score differently from the pipeline.
    """
    n_valid = model._get_feat_extract_output_lengths(input_lengths.to(logits.device))
    valid = torch.arange(logits.shape[1], device=logits.device)[None, :] < n_valid[:, None]
    blank = torch.full_like(logits, torch.finfo(logits.dtype).min)
    blank[..., model.config.pad_token_id] = 0
    return torch.where(valid[:, :, None], logits, blank)


def build_compute_metrics(tokenizer, metric_names, homophones: Optional[dict] = None):
    """The Trainer's `compute_metrics`: `metric_names` (wer, cer) of greedy decoding, and, with `homophones` (the
    positions of the homophone words of each evaluation transcript, keyed by the normalised transcript), the
    homophone accuracy and its length-matched control (`modeling_uot_ctc.homophone_accuracy`).

    The marks are found by transcript, not by position in the dataset: transformers 5 groups the evaluation batches
    by length too when `train_sampling_strategy` is `group_by_length`, so predictions do not come in dataset order."""
    metrics = {name: evaluate.load(METRIC_PATHS[name]) for name in metric_names}

    def compute_metrics(prediction):
        # The Trainer pads predictions of unequal length across batches with -100; those are blanks, not text.
        pred_ids = np.where(prediction.predictions == -100, tokenizer.pad_token_id, prediction.predictions)
        label_ids = np.where(prediction.label_ids == -100, tokenizer.pad_token_id, prediction.label_ids)
        predictions = tokenizer.batch_decode(pred_ids)
        references = tokenizer.batch_decode(label_ids, group_tokens=False)
        results = {
            name: metric.compute(predictions=predictions, references=references) for name, metric in metrics.items()
        }
        if homophones is not None:
            # Marks made under another normalisation (transcripts or word positions that do not fit): report the
            # rest, not crash.
            missing = [reference for reference in references if reference not in homophones]
            try:
                if missing:
                    raise ValueError(f"{len(missing)} references are not among the marked transcripts, e.g. "
                                     f"{missing[0]!r}")
                scores = homophone_accuracy(references, predictions, [homophones[r] for r in references])
            except ValueError as problem:
                logger.warning(f"No homophone accuracy: the evaluation data's marks do not fit ({problem}).")
            else:
                results.update(homophone_accuracy=scores["homophone_accuracy"],
                               homophone_words=scores["homophone_words"],
                               homophone_control_accuracy=scores["control_accuracy"])
        return results

    return compute_metrics


def homophone_positions(processed: datasets.DatasetDict) -> Optional[dict]:
    """The homophone word positions of each evaluation transcript, `{normalised transcript: [position, ...]}`, when
    the evaluation data marks them (a `homophones` column of JSON lists, as `python -m modeling_uot_ctc.corpus
    --homophones` writes), else None. One sentence marked two ways (two rows of one text) is refused."""
    if "eval" not in processed or "homophones" not in processed["eval"].column_names:
        return None
    marks = {}
    for text, positions in zip(processed["eval"]["normalised_text"], processed["eval"]["homophones"]):
        positions = json.loads(positions) if positions else []
        if marks.setdefault(text, positions) != positions:
            raise ValueError(f"The evaluation data marks {text!r} twice, differently: {marks[text]} and {positions}.")
    return marks


def argmax_logits(logits, labels):
    """Keep only the predicted ids, so that evaluation never stores full logits."""
    if isinstance(logits, tuple):
        logits = logits[0]
    return logits.argmax(-1)


def build_model(
    model_args, data_args, transfer_args, tokenizer, teacher_hidden_size, teacher_name
) -> Wav2Vec2ForCTCWithUOT:
    settings = dict(
        vocab_size=len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        ctc_loss_reduction=model_args.ctc_loss_reduction,
        ctc_zero_infinity=model_args.ctc_zero_infinity,
        attention_dropout=model_args.attention_dropout,
        activation_dropout=model_args.activation_dropout,
        feat_proj_dropout=model_args.feat_proj_dropout,
        hidden_dropout=model_args.hidden_dropout,
        final_dropout=model_args.final_dropout,
        mask_time_prob=model_args.mask_time_prob,
        mask_time_length=model_args.mask_time_length,
        mask_feature_prob=model_args.mask_feature_prob,
        mask_feature_length=model_args.mask_feature_length,
        layerdrop=model_args.layerdrop,
        add_adapter=model_args.add_adapter,
        teacher_hidden_size=teacher_hidden_size,
        teacher_name_or_path=teacher_name,
        teacher_layer=transfer_args.teacher_layer,
        **{f.name: getattr(transfer_args, f.name) for f in dataclasses.fields(TransferArguments)
           if not f.name.startswith("teacher_") and f.name not in SCRIPT_ONLY_TRANSFER_ARGUMENTS},
    )
    if model_args.model_name_or_path:
        model = Wav2Vec2ForCTCWithUOT.from_plain_wav2vec2(
            model_args.model_name_or_path, revision=model_args.model_revision, cache_dir=model_args.cache_dir,
            token=data_args.token, **settings,
        )
    else:
        model = Wav2Vec2ForCTCWithUOT(Wav2Vec2UOTConfig(**{**(model_args.model_config or {}), **settings}))
    if model_args.freeze_feature_encoder:
        model.freeze_feature_encoder()
    return model


def write_model_card(output_dir, model, metrics, data_args, model_args, training_args, plain: bool = False):
    """The README.md of `output_dir`: results in model-index form, the UOT settings and the teacher.

    `plain`: the card of the stock `Wav2Vec2ForCTC` export (`--plain_model_dir`), which loads without custom code.
    """
    config = model.config
    dataset_name = data_args.dataset_name or data_args.data_dir or data_args.train_file or "custom"
    results = [
        {"type": name, "value": round(float(metrics[f"eval_{name}"]), 4), "name": name.upper()}
        for name in data_args.eval_metrics if f"eval_{name}" in metrics
    ]
    language_model = has_language_model(output_dir)
    results += [
        {"type": name, "value": round(float(metrics[f"eval_{name}_lm"]), 4),
         "name": f"{name.upper()} with the n-gram language model"}
        for name in data_args.eval_metrics if f"eval_{name}_lm" in metrics
    ]
    repo_id = (model_args.plain_hub_model_id if plain else training_args.hub_model_id) or output_dir
    model_name = os.path.basename(os.path.normpath(repo_id))
    front_matter = {
        "library_name": "transformers",
        "pipeline_tag": "automatic-speech-recognition",
        "tags": ["automatic-speech-recognition", "ctc", "wav2vec2", "optimal-transport", "knowledge-transfer", "uot-asr"],
        "base_model": model_args.model_name_or_path,
        "model-index": [{
            "name": model_name,
            "results": [{
                "task": {"type": "automatic-speech-recognition", "name": "Speech Recognition"},
                "dataset": {"type": dataset_name, "name": dataset_name, "split": data_args.eval_split_name},
                "metrics": results,
            }] if results else [],
        }],
    }
    if not model_args.model_name_or_path:
        del front_matter["base_model"]
    settings = {k: getattr(config, k) for k in (
        "aligner", "alignment_eps", "rho_frames", "rho_tokens", "temporal_order_weight", "kt_weight", "kt_loss_type",
        "kt_warmup_steps", "kt_adapter", "kt_encoder_layer", "alignment_max_iter", "alignment_tol",
        "alignment_grad_mode", "kt_cuda_graphs", "alignment_graph_iterations")}
    rows = "\n".join(f"| `{k}` | {'inf (hard)' if v is None and k.startswith('rho') else v} |" for k, v in settings.items())
    result_lines = "\n".join(f"- {r['name']}: {r['value']}" for r in results) or "- (not evaluated)"
    # Greedy decoding of the scores the language model's figures start from (one utterance at a time): the pair
    # that isolates the decoder. Left out of the model index, whose greedy figure is the Trainer's.
    result_lines += "".join(
        f"\n- {name.upper()}, greedy, each utterance alone: {round(float(metrics[f'eval_{name}_greedy']), 4)}"
        for name in data_args.eval_metrics if f"eval_{name}_greedy" in metrics
    )
    card = f"""---
{yaml.safe_dump(front_matter, sort_keys=False).strip()}
---

# {model_name}

A wav2vec 2.0 CTC speech recogniser fine-tuned with unbalanced-optimal-transport (UOT) knowledge transfer from the
language model `{config.teacher_name_or_path}` (layer {config.teacher_layer}) with uot-asr. The teacher and the
alignment are used in training only: at inference this is a plain CTC model.{
" This copy is a stock `Wav2Vec2ForCTC` checkpoint, without the training adapter: it needs no custom code."
if plain else ""}

## Results on {dataset_name} ({data_args.eval_split_name})

{result_lines}

## Transfer settings

| setting | value |
|---|---|
{rows}

## Use

```python
from transformers import pipeline

asr = pipeline("automatic-speech-recognition", model="{repo_id}"{"" if plain else ", trust_remote_code=True"})
print(asr("speech.wav")["text"])
```
{_language_model_use(output_dir, repo_id) if language_model else ""}"""
    with open(os.path.join(output_dir, "README.md"), "w", encoding="utf-8") as handle:
        handle.write(card)


def _language_model_use(output_dir: str, repo_id: str) -> str:
    with open(os.path.join(output_dir, LANGUAGE_MODEL_DIR, "attrs.json"), encoding="utf-8") as handle:
        attrs = json.load(handle)
    return f"""
The folder also holds an n-gram language model (`language_model/`, KenLM; LM weight {attrs["alpha"]}, word bonus
{attrs["beta"]}) for beam search with pyctcdecode (`pip install kenlm pygtrie` and
`pip install --no-deps pyctcdecode==0.5.0`); the results above give greedy and LM decoding. With uot-asr installed
(the repository is fetched whole the first time):

```bash
python -m modeling_uot_ctc.transcribe {repo_id} speech.wav
```
"""


# ---------------------------------------------------------------------------------------------------------- main


def main(argv: Optional[list[str]] = None, callbacks: Optional[list[TrainerCallback]] = None):
    """Run the recipe; `argv` replaces the command line and `callbacks` are added to the Trainer's."""
    model_args, data_args, transfer_args, decoding_args, training_args = parse_arguments(
        sys.argv[1:] if argv is None else argv
    )
    if data_args.phoneme_language:
        raise NotImplementedError("Phoneme targets (--phoneme_language) are not supported: use character targets.")
    check_plain_export_arguments(model_args, training_args)
    check_decoding_arguments(decoding_args, data_args, training_args)
    setup_logging(training_args)
    set_seed(training_args.seed)
    last_checkpoint = find_checkpoint(training_args)

    # 1. Data, with normalised transcripts.
    raw = load_raw_datasets(data_args, training_args, model_args.cache_dir, decoding_args)
    raw = raw.map(
        lambda text: {"normalised_text": normalise_text(text, data_args.chars_to_ignore, data_args.do_lower_case)},
        input_columns=[data_args.text_column_name],
        desc="normalise text",
    )

    # 2. Vocabulary, feature extractor and processor.
    with training_args.main_process_first(desc="vocabulary"):
        tokenizer = build_tokenizer(raw, model_args, data_args, transfer_args, training_args.output_dir)
    feature_extractor = load_feature_extractor(model_args, data_args)
    processor = Wav2Vec2Processor(feature_extractor=feature_extractor, tokenizer=tokenizer)
    # The n-gram language model, saved with the model by the first process, which alone decodes with it (built
    # first: a missing estimator stops the run here).
    decoder = None
    if decoding_args.lm_text and is_word_piece_vocabulary(tokenizer):
        raise ValueError("--lm_text decodes character vocabularies only: the n-gram decoder reads each unit as one "
                         "character; leave it out with --output_units word_pieces.")
    if decoding_args.lm_text and training_args.process_index == 0:
        decoder = build_language_model(
            language_model_text(decoding_args, raw, data_args), training_args.output_dir, tokenizer,
            decoding_args.lm_order, decoding_args.lm_alpha, decoding_args.lm_beta,
        )

    # 3. The teacher (its width sizes the adapter).
    teacher = None
    teacher_name = transfer_args.teacher_name_or_path or DEFAULT_TEACHER_NAME
    if transfer_args.aligner != "none" and transfer_args.kt_weight > 0:
        teacher = TextTeacher(
            teacher_name, layer=transfer_args.teacher_layer, revision=transfer_args.teacher_revision,
            cache_dir=model_args.cache_dir, token=data_args.token, trust_remote_code=data_args.trust_remote_code,
        )
    teacher_width = teacher.hidden_size if teacher is not None else 1

    # 4. Model, and how several processes train it.
    model = build_model(model_args, data_args, transfer_args, tokenizer, teacher_width, teacher_name)
    configure_unused_parameter_detection(training_args)

    # 5. Audio and labels, checked.
    frames_for = lambda n: int(model._get_feat_extract_output_lengths(torch.tensor(n)))  # noqa: E731
    processed = preprocess(raw, tokenizer, feature_extractor, frames_for, data_args, training_args)
    if data_args.preprocessing_only:
        processed.save_to_disk(os.path.join(training_args.output_dir, "preprocessed"))
        logger.info("Preprocessing done; stopping as --preprocessing_only asks.")
        return None

    # 6. Teacher states: cached once on disk (keyed by the teacher's fingerprint and transcript), or per batch.
    teacher_states = None
    if teacher is not None:
        if transfer_args.teacher_on_the_fly:
            teacher_states = teacher
        else:
            teacher_states = TeacherStateCache(teacher, transfer_args.teacher_cache_dir)
            with training_args.main_process_first(desc="teacher states"):
                teacher_states.fill({
                    text for split in ("train", "eval") if split in processed
                    for text in processed[split]["normalised_text"]
                })

    # 7. Train and evaluate.
    training_args.remove_unused_columns = False
    training_args.length_column_name = "input_length"
    results = {}
    trainer = UOTTrainer(
        model=model,
        args=training_args,
        data_collator=DataCollatorCTCWithTeacher(processor, teacher_states, frame_timing(model.config)),
        train_dataset=processed.get("train"),
        eval_dataset=processed.get("eval"),
        processing_class=processor,
        compute_metrics=build_compute_metrics(tokenizer, data_args.eval_metrics, homophone_positions(processed)),
        preprocess_logits_for_metrics=argmax_logits,
        callbacks=callbacks,
        model_card_writer=lambda: write_model_card(
            training_args.output_dir, model, results, data_args, model_args, training_args
        ),
    )
    add_plan_pictures(trainer, processed, teacher_states, transfer_args, training_args)
    if training_args.do_train:
        checkpoint = training_args.resume_from_checkpoint or last_checkpoint
        train_result = trainer.train(resume_from_checkpoint=checkpoint)
        trainer.save_model()
        train_metrics = {**train_result.metrics, "train_samples": len(processed["train"])}
        trainer.log_metrics("train", train_metrics)
        trainer.save_metrics("train", train_metrics)
        trainer.save_state()
        results.update(train_metrics)
    eval_metrics = {}
    if training_args.do_eval:
        eval_metrics = {**trainer.evaluate(), "eval_samples": len(processed["eval"])}
    # The n-gram decoding runs in the first process alone, after every step that needs all of them.
    if decoder is not None and "lm_tune" in processed:
        # The LM weight and the word bonus, chosen on the tuning split and stored with the model.
        choice = tune_language_model(model, processed["lm_tune"], decoder, decoding_args)
        store_weights(training_args.output_dir, choice["alpha"], choice["beta"])
        tune_metrics = {"lm_alpha": choice["alpha"], "lm_beta": choice["beta"], "lm_tune_wer": choice["wer"],
                        "lm_tune_samples": len(processed["lm_tune"])}
        trainer.log_metrics("lm_tune", tune_metrics)
        trainer.save_metrics("lm_tune", tune_metrics)
        results.update(tune_metrics)
    if training_args.do_eval:
        if decoder is not None:
            eval_metrics.update(evaluate_with_language_model(
                model, processed["eval"], decoder, tokenizer, data_args.eval_metrics, decoding_args.lm_beam_width
            ))
        trainer.log_metrics("eval", eval_metrics)
        trainer.save_metrics("eval", eval_metrics)
        results.update(eval_metrics)

    # 8. Model card, the plain export, and the Hub.
    if trainer.is_world_process_zero():
        processor.save_pretrained(training_args.output_dir)
        write_model_card(training_args.output_dir, model, results, data_args, model_args, training_args)
        if model_args.plain_model_dir:
            export_plain_model(model, processor, results, data_args, model_args, training_args)
    if training_args.push_to_hub:
        trainer.push_to_hub()
    return results


def configure_unused_parameter_detection(training_args: TrainingArguments) -> None:
    """Let DDP look for parameters without a gradient under activation checkpointing, unless the user chose.

    Some parameters get none in some steps: the adapter while the transfer waits (`kt_warmup_steps`) or never runs,
    whole layers under layerdrop, SpecAugment's mask embedding when only channels are masked. The Trainer turns the
    search off under activation checkpointing (it breaks the reentrant kind), and DDP then stops at the next step
    ("Expected to have finished reduction in the prior iteration"); without checkpointing the Trainer keeps it on.
    """
    if training_args.ddp_find_unused_parameters is not None or not training_args.activation_checkpointing:
        return
    reentrant = dict(training_args.activation_checkpointing_kwargs or {}).get("use_reentrant")
    if reentrant and training_args.world_size > 1:
        raise ValueError(
            "Reentrant activation checkpointing cannot run under DDP when some parameters may go without a gradient "
            "(transfer warm-up, layerdrop, SpecAugment): drop use_reentrant from activation_checkpointing_kwargs, or "
            "set --ddp_find_unused_parameters false if every parameter gets a gradient in every step."
        )
    if not reentrant:
        training_args.ddp_find_unused_parameters = True


def check_plain_export_arguments(model_args: ModelArguments, training_args: TrainingArguments) -> None:
    """Refuse, before any training, a plain export that could not happen or would overwrite the UOT checkpoint."""
    if model_args.plain_hub_model_id and not model_args.plain_model_dir:
        raise ValueError("--plain_hub_model_id pushes the folder of --plain_model_dir: give that folder too.")
    if model_args.plain_model_dir and os.path.abspath(model_args.plain_model_dir) == os.path.abspath(
        training_args.output_dir
    ):
        raise ValueError(
            "--plain_model_dir must differ from --output_dir: the plain checkpoint would overwrite the UOT one."
        )


def export_plain_model(model, processor, results, data_args, model_args, training_args) -> None:
    """Write the stock `Wav2Vec2ForCTC` copy of `model` to `--plain_model_dir`, and push it if asked."""
    folder = model_args.plain_model_dir
    model.save_plain_pretrained(folder)
    processor.save_pretrained(folder)
    if has_language_model(training_args.output_dir):  # the n-gram model serves the plain copy as well
        shutil.copy2(os.path.join(training_args.output_dir, ALPHABET_FILE), folder)
        shutil.copytree(os.path.join(training_args.output_dir, LANGUAGE_MODEL_DIR),
                        os.path.join(folder, LANGUAGE_MODEL_DIR), dirs_exist_ok=True)
    write_model_card(folder, model, results, data_args, model_args, training_args, plain=True)
    if model_args.plain_hub_model_id:
        from huggingface_hub import HfApi

        api = HfApi(token=training_args.hub_token)
        api.create_repo(model_args.plain_hub_model_id, private=training_args.hub_private_repo, exist_ok=True)
        api.upload_folder(
            repo_id=model_args.plain_hub_model_id, folder_path=folder,
            commit_message="Stock wav2vec2 CTC checkpoint, trained with uot-asr",
        )


def add_plan_pictures(trainer, processed, teacher_states, transfer_args, training_args) -> None:
    """Give the Trainer a `PlanPictureCallback` when it reports to TensorBoard and the transfer has a teacher."""
    from transformers.integrations import TensorBoardCallback

    tensorboard = next((c for c in trainer.callback_handler.callbacks if isinstance(c, TensorBoardCallback)), None)
    if not (transfer_args.plan_picture_every > 0 and teacher_states is not None and tensorboard is not None):
        return
    if "train" not in processed:  # nothing trains, so nothing is logged
        return
    example = (processed["eval"] if "eval" in processed else processed["train"])[0]
    tokens = teacher_states([example["normalised_text"]]).tokens[0]
    trainer.add_callback(
        PlanPictureCallback(trainer.data_collator([example]), tokens, transfer_args.plan_picture_every, tensorboard)
    )


def check_decoding_arguments(decoding_args: DecodingArguments, data_args, training_args) -> None:
    """Refuse, before any training, a language model that could not be built, that one process could not decode
    with, or whose weights would be tuned on the test data."""
    tune_split, tune_file = decoding_args.lm_tune_split_name, decoding_args.lm_tune_file
    if not decoding_args.lm_text:
        if tune_split or tune_file:
            raise ValueError("--lm_tune_split_name / --lm_tune_file tune a language model: give --lm_text too.")
        return
    if decoding_args.lm_text == "train" and not training_args.do_train:
        raise ValueError("--lm_text train reads the training transcripts: it needs --do_train (or give a text file).")
    if decoding_args.lm_text != "train" and not os.path.isfile(decoding_args.lm_text):
        raise FileNotFoundError(f"--lm_text {decoding_args.lm_text}: no such file (or 'train').")
    if training_args.fsdp or training_args.deepspeed:
        raise ValueError(
            "--lm_text: the n-gram decoding runs the model in one process, and FSDP or DeepSpeed splits it across "
            "all of them. Train without --lm_text, then build and tune the language model on the saved model with "
            "`python -m modeling_uot_ctc.language_model`."
        )
    if tune_split and tune_file:
        raise ValueError("Give one of --lm_tune_split_name and --lm_tune_file, not both.")
    if tune_split and (data_args.train_file or data_args.eval_file):
        raise ValueError(
            f"--lm_tune_split_name {tune_split} names a split of --dataset_name or --data_dir, but the data come from "
            "manifests (--train_file / --eval_file): give the tuning set as --lm_tune_file."
        )
    # A slice of the evaluation split (`test[:100]`) is still the test data.
    if tune_split and tune_split.split("[")[0].strip() == data_args.eval_split_name.split("[")[0].strip():
        raise ValueError(f"--lm_tune_split_name {tune_split} is the evaluation split: tune on a validation split.")
    if tune_file and data_args.eval_file and os.path.abspath(tune_file) == os.path.abspath(data_args.eval_file):
        raise ValueError("--lm_tune_file is the evaluation manifest: tune on a validation set.")
    if training_args.process_index == 0:
        for tool in ("lmplz", "build_binary"):
            find_kenlm_tool(tool)


def language_model_text(decoding_args: DecodingArguments, raw: datasets.DatasetDict, data_args) -> list[str]:
    """The language model's sentences, normalised as the transcripts are: the training transcripts, or a file."""
    if decoding_args.lm_text == "train":
        return list(raw["train"]["normalised_text"])
    with open(decoding_args.lm_text, encoding="utf-8") as handle:
        return [normalise_text(line, data_args.chars_to_ignore, data_args.do_lower_case) for line in handle]


def _utterance_scores(model, dataset) -> list[np.ndarray]:
    return transcription_log_probs(model, [np.asarray(values, dtype=np.float32) for values in dataset["input_values"]])


def evaluate_with_language_model(model, dataset, decoder, tokenizer, metric_names, beam_width) -> dict:
    """`eval_<metric>_lm`: the metrics of beam search with the language model, each utterance scored alone; and
    `eval_<metric>_greedy`: those of greedy decoding of the same scores, so that the two differ in the decoder only
    (`eval_<metric>` comes from padded batches)."""
    scores = _utterance_scores(model, dataset)
    references = list(dataset["normalised_text"])
    decoded = {"lm": decode_with_language_model(decoder, scores, beam_width), "greedy": greedy(tokenizer, scores)}
    results = {}
    for name in metric_names:
        metric = evaluate.load(METRIC_PATHS[name])
        for way, hypotheses in decoded.items():
            results[f"eval_{name}_{way}"] = metric.compute(predictions=hypotheses, references=references)
    return results


def tune_language_model(model, dataset, decoder, decoding_args: DecodingArguments) -> dict:
    """Choose `lm_alpha` and `lm_beta` from their grids by WER on `dataset` (see `choose_weights`)."""
    return choose_weights(
        decoder, _utterance_scores(model, dataset), list(dataset["normalised_text"]),
        decoding_args.lm_alpha_grid, decoding_args.lm_beta_grid, decoding_args.lm_beam_width,
    )


def setup_logging(training_args: TrainingArguments) -> None:
    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", handlers=[logging.StreamHandler()])
    level = training_args.get_process_log_level()
    logger.setLevel(level)
    datasets.utils.logging.set_verbosity(level)
    hf_logging.set_verbosity(level)
    hf_logging.enable_default_handler()
    hf_logging.enable_explicit_format()
    logger.info(f"Training arguments: {training_args}")


def find_checkpoint(training_args: TrainingArguments) -> Optional[str]:
    """The last checkpoint in the output folder when training resumes there."""
    if not (training_args.do_train and os.path.isdir(training_args.output_dir)):
        return None
    checkpoint = get_last_checkpoint(training_args.output_dir)
    if checkpoint is not None:
        logger.info(f"Resuming from {checkpoint}; use another --output_dir to start afresh.")
    return checkpoint


def load_feature_extractor(model_args: ModelArguments, data_args: DataTrainingArguments):
    if model_args.model_name_or_path:
        try:
            return AutoFeatureExtractor.from_pretrained(
                model_args.model_name_or_path, revision=model_args.model_revision, cache_dir=model_args.cache_dir,
                token=data_args.token, trust_remote_code=data_args.trust_remote_code,
            )
        except OSError:
            logger.info("The checkpoint has no feature extractor; using wav2vec 2.0's defaults.")
    return Wav2Vec2FeatureExtractor(
        feature_size=1, sampling_rate=SAMPLING_RATE, padding_value=0.0, do_normalize=True, return_attention_mask=True
    )


if __name__ == "__main__":
    main()
