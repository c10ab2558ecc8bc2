"""Every config in configs/ parses; the realistic GPU ones build their objects with tiny local stand-ins."""

import glob
import os

import datasets
import numpy as np
import pytest
import torch
from transformers import Wav2Vec2Config, Wav2Vec2FeatureExtractor, Wav2Vec2ForCTC

import run_speech_recognition_uot as script
from modeling_uot_ctc.teacher import TextTeacher
from script_fixtures import TINY_MODEL, speech_like, write_teacher

CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")
DEMO = os.path.join(CONFIGS, "demo.yaml")
ABLATIONS = sorted(glob.glob(os.path.join(CONFIGS, "ablation_*.yaml")))
REALISTIC = {"librispeech_clean100.yaml": "THE AIR IS CLEAN, ISN'T IT?", "aishell1.yaml": "今天的空气很清新。"}


def test_demo_and_ablations_parse():
    base = script.parse_arguments([DEMO])
    assert base[2].aligner == "uot" and base[0].model_config["hidden_size"] == 144 and base[3].lm_text is None
    seen = set()
    for path in ABLATIONS:
        model_args, data_args, transfer_args, _, training_args = script.parse_arguments([DEMO, path])
        assert training_args.max_steps == base[4].max_steps  # same budget for every row
        assert training_args.output_dir != base[4].output_dir
        seen.add((transfer_args.aligner, transfer_args.rho_frames, transfer_args.temporal_order_weight))
    assert {("none", 1.0, 0.0), ("ot", 1.0, 0.0), ("ot", 1.0, 1.0)} <= seen
    assert {rho for aligner, rho, _ in seen if aligner == "uot"} == {0.1, 1.0, 10.0}


@pytest.fixture(scope="module")
def stand_ins(tmp_path_factory):
    root = tmp_path_factory.mktemp("stand_ins")
    wav2vec2 = root / "wav2vec2-base"
    torch.manual_seed(0)
    Wav2Vec2ForCTC(Wav2Vec2Config(**TINY_MODEL, vocab_size=32)).save_pretrained(wav2vec2)
    Wav2Vec2FeatureExtractor(return_attention_mask=False, do_normalize=True).save_pretrained(wav2vec2)
    teacher = write_teacher(str(root / "teacher"), hidden_size=24)
    return str(wav2vec2), teacher


@pytest.mark.parametrize("name", sorted(REALISTIC))
def test_realistic_config_builds_with_stand_ins(name, stand_ins, tmp_path):
    wav2vec2, teacher_path = stand_ins
    path = os.path.join(CONFIGS, name)
    model_args, data_args, transfer_args, _, training_args = script.parse_arguments(
        [path, "--output_dir", str(tmp_path), "--use_cpu", "--bf16", "false"]
    )
    assert model_args.model_name_or_path == "facebook/wav2vec2-base"
    assert transfer_args.teacher_name_or_path in {"bert-base-uncased", "bert-base-chinese"}
    model_args.model_name_or_path, transfer_args.teacher_name_or_path = wav2vec2, teacher_path

    transcript = script.normalise_text(REALISTIC[name], data_args.chars_to_ignore, data_args.do_lower_case)
    raw = datasets.DatasetDict({"train": datasets.Dataset.from_dict({"normalised_text": [transcript]})})
    tokenizer = script.build_tokenizer(raw, model_args, data_args, transfer_args, str(tmp_path))
    if name == "aishell1.yaml":
        assert set(transcript) <= set(tokenizer.get_vocab()) and " " not in transcript  # character units
    teacher = TextTeacher(transfer_args.teacher_name_or_path, layer=transfer_args.teacher_layer)
    model = script.build_model(model_args, data_args, transfer_args, tokenizer, teacher.hidden_size, "stand-in")
    assert model.config.teacher_hidden_size == 24 and model.config.rho_frames == transfer_args.rho_frames
    assert model.config.vocab_size == len(tokenizer)
    extractor = script.load_feature_extractor(model_args, data_args)
    processor = script.Wav2Vec2Processor(feature_extractor=extractor, tokenizer=tokenizer)
    audio = speech_like("the air is clean", np.random.default_rng(0))
    feature = {"input_values": extractor(audio, sampling_rate=16_000).input_values[0],
               "labels": tokenizer(transcript).input_ids, "normalised_text": "the air is clean"}
    batch = script.DataCollatorCTCWithTeacher(processor, teacher)([feature, feature])
    out = model.train()(**batch)
    assert torch.isfinite(out.loss) and out.kt_loss is not None
