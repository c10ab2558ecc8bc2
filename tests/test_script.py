"""run_speech_recognition_uot.py end to end on a tiny corpus made inside the tests, offline."""

import json
import os
import shutil
import subprocess
import sys
from types import SimpleNamespace

import datasets
import numpy as np
import torch
import pytest
import soundfile
import yaml
from transformers import TrainerCallback, Wav2Vec2CTCTokenizer, Wav2Vec2FeatureExtractor, pipeline

import run_speech_recognition_uot as script
from script_fixtures import SENTENCES, base_arguments, speech_like, write_teacher

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def trained(corpus, teacher, tmp_path_factory):
    output_dir = str(tmp_path_factory.mktemp("run") / "out")
    results = script.main(base_arguments(corpus, teacher, output_dir))
    return output_dir, results


def test_end_to_end_trains_evaluates_and_serves(trained, teacher):
    output_dir, results = trained
    saved = json.load(open(os.path.join(output_dir, "eval_results.json")))
    assert 0 <= saved["eval_wer"] and 0 <= saved["eval_cer"]
    assert saved["eval_wer"] == pytest.approx(results["eval_wer"])
    history = json.load(open(os.path.join(output_dir, "trainer_state.json")))["log_history"]
    steps = [entry for entry in history if "loss" in entry and "step" in entry]
    assert len(steps) == 4
    for entry in steps:
        for name in ("ctc_loss", "kt_loss", "token_coverage", "dropped_frame_fraction", "transported_mass"):
            assert name in entry
        assert 0.0 <= entry["alignment_converged"] <= 1.0
        assert entry["loss"] == pytest.approx(entry["ctc_loss"] + 0.5 * entry["kt_loss"], rel=1e-4)
    asr = pipeline("automatic-speech-recognition", model=output_dir, device=-1)
    audio = speech_like("the air is clean", np.random.default_rng(0))
    assert isinstance(asr(audio)["text"], str)

    card = open(os.path.join(output_dir, "README.md")).read()
    front = yaml.safe_load(card.split("---")[1])
    assert front["pipeline_tag"] == "automatic-speech-recognition"
    metrics = {m["type"]: m["value"] for m in front["model-index"][0]["results"][0]["metrics"]}
    assert metrics["wer"] == pytest.approx(round(saved["eval_wer"], 4))
    assert metrics["cer"] == pytest.approx(round(saved["eval_cer"], 4))
    assert teacher in card and "| `rho_frames` | 1.0 |" in card and "| `aligner` | uot |" in card
    assert not os.path.exists(os.path.join(output_dir, "teacher_cache"))


def test_config_file_with_overriding_flags_and_manifests(corpus, teacher, tmp_path):
    settings = {}
    flags = base_arguments(corpus, teacher, str(tmp_path / "out"), data_dir=None, max_steps=7)
    key = None
    for token in flags:
        if token.startswith("--"):
            key = token[2:]
            settings[key] = True
        elif isinstance(settings[key], list):
            settings[key].append(token)
        elif settings[key] is True:
            settings[key] = token
        else:
            settings[key] = [settings[key], token]
    settings["model_config"] = json.loads(settings["model_config"])
    settings.update(train_file=os.path.join(corpus, "train.jsonl"), eval_file=os.path.join(corpus, "test.jsonl"))
    settings.update(max_steps=7, do_train=True, do_eval=True, use_cpu=True)
    config_file = tmp_path / "run.yaml"
    config_file.write_text(yaml.safe_dump(settings))
    results = script.main([str(config_file), "--max_steps", "2", "--aligner", "ot"])
    assert results["eval_wer"] >= 0
    state = json.load(open(tmp_path / "out" / "trainer_state.json"))
    assert state["global_step"] == 2  # the flag won over the file
    assert json.load(open(tmp_path / "out" / "config.json"))["aligner"] == "ot"
    with pytest.raises(ValueError, match="unknown arguments"):
        bad = tmp_path / "bad.json"
        bad.write_text(json.dumps({"output_dir": str(tmp_path), "not_an_option": 1}))
        script.main([str(bad)])


def test_push_to_hub_delivers_a_loadable_model(corpus, teacher, tmp_path, monkeypatch):
    import huggingface_hub

    hub = tmp_path / "hub"
    calls = []

    def create_repo(self, repo_id, **kwargs):
        calls.append(("create_repo", repo_id))
        return SimpleNamespace(repo_id=repo_id)

    def upload_folder(self, repo_id, folder_path, ignore_patterns=None, **kwargs):
        calls.append(("upload_folder", repo_id))
        ignore = shutil.ignore_patterns(*(ignore_patterns or []))
        shutil.copytree(folder_path, hub / repo_id, ignore=ignore, dirs_exist_ok=True)
        return SimpleNamespace(commit_url="fake", oid="0")

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", create_repo)
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", upload_folder)
    monkeypatch.setattr(huggingface_hub.HfApi, "create_commit", lambda *a, **k: pytest.fail("unexpected commit"))
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # any real call fails at once
    argv = base_arguments(corpus, teacher, str(tmp_path / "out"), max_steps=2, push_to_hub=True,
                          hub_model_id="someone/tiny-uot", hub_token="not-a-token", lm_text="train", lm_order=2,
                          plain_model_dir=str(tmp_path / "plain"), plain_hub_model_id="someone/tiny-plain")
    script.main(argv)
    delivered = hub / "someone" / "tiny-uot"
    assert ("create_repo", "someone/tiny-uot") in calls and ("upload_folder", "someone/tiny-uot") in calls
    assert ("create_repo", "someone/tiny-plain") in calls and ("upload_folder", "someone/tiny-plain") in calls
    plain = hub / "someone" / "tiny-plain"
    assert json.loads((plain / "config.json").read_text())["model_type"] == "wav2vec2"
    assert not list(plain.glob("*.py")) and (plain / "vocab.json").exists()
    assert "someone/tiny-plain" in (plain / "README.md").read_text()
    plain_asr = pipeline("automatic-speech-recognition", model=str(plain), device=-1)
    assert type(plain_asr.model).__name__ == "Wav2Vec2ForCTC"
    for name in ("model.safetensors", "config.json", "vocab.json", "tokenizer_config.json", "README.md",
                 "modeling_wav2vec2_uot.py", "solver.py"):
        assert (delivered / name).exists(), name
    card = yaml.safe_load((delivered / "README.md").read_text().split("---")[1])
    assert {m["type"] for m in card["model-index"][0]["results"][0]["metrics"]} == {"wer", "cer"}
    asr = pipeline("automatic-speech-recognition", model=str(delivered), trust_remote_code=True, device=-1)
    audio = speech_like("open the door", np.random.default_rng(1))
    assert isinstance(asr(audio)["text"], str)
    assert plain_asr(audio)["text"] == asr(audio)["text"]
    # Both repositories carry the n-gram model, which loads back into a decoder for the model's vocabulary.
    from modeling_uot_ctc.language_model import load_decoder

    for folder in (delivered, plain):
        assert (folder / "alphabet.json").exists() and (folder / "language_model" / "2gram.bin").exists()
        tokenizer = Wav2Vec2CTCTokenizer.from_pretrained(str(folder))
        assert isinstance(load_decoder(str(folder), tokenizer).decode(np.zeros((5, len(tokenizer)), np.float32)), str)


class StopAt(TrainerCallback):
    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_save = True
            control.should_training_stop = True


def test_resume_ends_where_an_uninterrupted_run_ends(corpus, teacher, tmp_path):
    common = dict(max_steps=6, save_strategy="steps", save_steps=3, mask_time_prob=0.3, hidden_dropout=0.1)
    whole = script.main(base_arguments(corpus, teacher, str(tmp_path / "whole"), **common))
    script.main(base_arguments(corpus, teacher, str(tmp_path / "parts"), **common), callbacks=[StopAt(3)])
    assert os.path.isdir(tmp_path / "parts" / "checkpoint-3")
    resumed = script.main(base_arguments(corpus, teacher, str(tmp_path / "parts"), **common))

    def last_loss(folder):
        history = json.load(open(folder / "trainer_state.json"))["log_history"]
        return [e for e in history if "loss" in e and "step" in e][-1]

    a, b = last_loss(tmp_path / "whole"), last_loss(tmp_path / "parts")
    assert a["step"] == b["step"] == 6
    assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)
    assert resumed["eval_wer"] == pytest.approx(whole["eval_wer"])


def test_help_prints_every_argument():
    done = subprocess.run([sys.executable, os.path.join(REPO, "run_speech_recognition_uot.py"), "--help"],
                          capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
    assert done.returncode == 0, done.stderr[-2000:]
    parser = script.HfArgumentParser((
        script.ModelArguments, script.DataTrainingArguments, script.TransferArguments, script.DecodingArguments,
        script.TrainingArguments,
    ))
    names = {action.dest for action in parser._actions if action.dest != "help"}
    assert len(names) > 150
    missing = sorted(name for name in names if f"--{name}" not in done.stdout)
    assert not missing


class RecordEvaluationInputs(TrainerCallback):
    """Notes, for every forward pass of the model, whether it trained and whether it received teacher states."""

    def __init__(self):
        self.calls = []

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        model.register_forward_pre_hook(
            lambda module, a, kw: self.calls.append((module.training, "teacher_hidden_states" in kw)), with_kwargs=True
        )


def test_evaluation_runs_neither_teacher_nor_transfer(corpus, teacher, tmp_path, monkeypatch):
    """What evaluation measures is the plain CTC model users run: eval_loss is the CTC loss, and an evaluation
    batch costs neither the teacher nor the solver."""
    from modeling_uot_ctc.teacher import TeacherStateCache

    lookups = []
    original = TeacherStateCache.__call__
    monkeypatch.setattr(
        TeacherStateCache, "__call__", lambda self, texts: lookups.append(len(texts)) or original(self, texts)
    )
    recorder = RecordEvaluationInputs()
    arguments = base_arguments(
        corpus, teacher, str(tmp_path / "out"), max_steps=2, eval_strategy="steps", eval_steps=1,
        per_device_eval_batch_size=2,  # two evaluation batches
    )
    results = script.main(arguments, callbacks=[recorder])
    training = [with_teacher for is_training, with_teacher in recorder.calls if is_training]
    evaluation = [with_teacher for is_training, with_teacher in recorder.calls if not is_training]
    assert training == [True, True] and evaluation and not any(evaluation)
    assert len(lookups) == 2  # the two training batches, none of the evaluations'
    plain = script.Wav2Vec2ForCTCWithUOT.from_pretrained(str(tmp_path / "out")).eval()
    processor = script.Wav2Vec2Processor.from_pretrained(str(tmp_path / "out"))
    # The eval loss of a CTC model: the mean over evaluation batches of 2 of their CTC loss, recomputed here.
    rows = datasets.load_dataset("csv", data_files=os.path.join(corpus, "test", "metadata.csv"), split="train")
    losses = []
    for start in range(0, len(rows), 2):
        chunk = rows[start : start + 2]
        audio = [soundfile.read(os.path.join(corpus, "test", name), dtype="float32")[0] for name in chunk["file_name"]]
        inputs = processor.feature_extractor(audio, sampling_rate=16_000, padding=True, return_tensors="pt")
        texts = [script.normalise_text(text, [".", ","], True) for text in chunk["text"]]
        labels = processor.tokenizer(texts, padding=True, return_tensors="pt")
        inputs["labels"] = labels.input_ids.masked_fill(labels.attention_mask.ne(1), -100)
        with torch.no_grad():
            losses.append(plain(**inputs).loss.item())
    assert results["eval_loss"] == pytest.approx(np.mean(losses), rel=1e-4)


# Bad input: each case stops with a message naming the row or file, or is skipped and counted.


def write_wav(path, samples, rate=16_000):
    soundfile.write(path, samples, rate)
    return str(path)


def raw_split(rows):
    return datasets.DatasetDict({"train": datasets.Dataset.from_list(rows)})


def run_preprocess(rows, invalid_data, tokenizer=None, resample=True):
    data_args = script.DataTrainingArguments(invalid_data=invalid_data, resample=resample, max_duration_in_seconds=30)
    raw = raw_split(rows).map(lambda r: {"normalised_text": script.normalise_text(r["text"], [".", ","], True)})
    if tokenizer is None:
        tokenizer = build_char_tokenizer()
    extractor = Wav2Vec2FeatureExtractor(return_attention_mask=True)
    training_args = script.TrainingArguments(output_dir="unused", report_to="none")
    frames_for = lambda n: n // 320  # noqa: E731  (50 frames a second)
    return script.preprocess(raw, tokenizer, extractor, frames_for, data_args, training_args)


def build_char_tokenizer(characters="abcdefghijklmnopqrstuvwxyz'", folder=None):
    import tempfile

    folder = folder or tempfile.mkdtemp()
    vocab = {"[PAD]": 0, "[UNK]": 1, "|": 2, **{c: i + 3 for i, c in enumerate(characters)}}
    path = os.path.join(folder, "vocab.json")
    json.dump(vocab, open(path, "w"))
    return Wav2Vec2CTCTokenizer(path, unk_token="[UNK]", pad_token="[PAD]", word_delimiter_token="|",
                                bos_token=None, eos_token=None)


@pytest.fixture
def good_row(tmp_path):
    audio = speech_like("the cat sat down", np.random.default_rng(2))
    return {"audio": write_wav(tmp_path / "good.wav", audio), "text": "The cat sat down."}


def bad_rows(tmp_path):
    truncated = tmp_path / "truncated.wav"
    write_wav(truncated, np.zeros(16000, dtype=np.float32))
    truncated.write_bytes(truncated.read_bytes()[:40])
    garbage = tmp_path / "garbage.wav"
    garbage.write_bytes(b"this is not audio at all")
    return {
        "unreadable": ({"audio": str(garbage), "text": "open the door"}, "garbage.wav"),
        "truncated": ({"audio": str(truncated), "text": "open the door"}, "truncated.wav"),
        "empty transcript": ({"audio": write_wav(tmp_path / "e.wav", np.ones(8000, np.float32) * 0.1), "text": " .,"},
                             "e.wav"),
        "outside vocabulary": ({"audio": write_wav(tmp_path / "o.wav", np.ones(16000, np.float32) * 0.1),
                                "text": "naïve café"}, "o.wav"),
        "label longer than audio": ({"audio": write_wav(tmp_path / "s.wav", np.ones(1600, np.float32) * 0.1),
                                     "text": "a very long transcript for a tenth of a second"}, "s.wav"),
    }


@pytest.mark.parametrize("case", ["unreadable", "truncated", "empty transcript", "outside vocabulary",
                                  "label longer than audio"])
def test_bad_input_errors_name_the_file(case, tmp_path, good_row):
    row, name = bad_rows(tmp_path)[case]
    with pytest.raises(script.InvalidExample, match=name):
        run_preprocess([good_row, row], invalid_data="error")


@pytest.mark.parametrize("case", ["unreadable", "truncated", "empty transcript", "outside vocabulary",
                                  "label longer than audio"])
def test_bad_input_is_skipped_and_counted(case, tmp_path, good_row, caplog):
    row, name = bad_rows(tmp_path)[case]
    with caplog.at_level("WARNING"):
        processed = run_preprocess([good_row, row, good_row], invalid_data="skip")
    assert len(processed["train"]) == 2
    assert "skipped 1 invalid example(s) of 3" in caplog.text and name in caplog.text


def test_wrong_sample_rate_is_resampled_or_rejected(tmp_path):
    rate = 8_000
    tone = np.sin(2 * np.pi * 440 * np.arange(rate) / rate).astype(np.float32)
    row = {"audio": write_wav(tmp_path / "8k.wav", tone, rate), "text": "open the door"}
    processed = run_preprocess([row], invalid_data="error")
    assert processed["train"][0]["input_length"] == 16_000  # one second, now at 16 kHz
    with pytest.raises(script.InvalidExample, match="8k.wav.*8000 Hz"):
        run_preprocess([row], invalid_data="error", resample=False)


def test_missing_column_is_named(corpus, teacher, tmp_path):
    argv = base_arguments(corpus, teacher, str(tmp_path / "out"), text_column_name="sentence")
    with pytest.raises(ValueError, match="no column 'sentence'.*text"):
        script.main(argv)


def test_full_run_survives_a_bad_file(corpus, teacher, tmp_path):
    broken = tmp_path / "corpus"
    shutil.copytree(corpus, broken)
    (broken / "train" / "train_000.wav").write_bytes(b"RIFF\x00\x00")
    results = script.main(base_arguments(str(broken), teacher, str(tmp_path / "out"), max_steps=2))
    assert results["train_samples"] == 7


# Teacher states cache.


def test_teacher_cache_is_keyed_by_teacher_layer_and_text(teacher, tmp_path):
    from modeling_uot_ctc.teacher import TeacherStateCache, TextTeacher

    last, first = TextTeacher(teacher, layer=-1), TextTeacher(teacher, layer=1)
    cache_last = TeacherStateCache(last, tmp_path)
    cache_first = TeacherStateCache(first, tmp_path)
    assert cache_last.folder != cache_first.folder
    assert cache_last.fill(SENTENCES[:3]) == 3 and cache_last.fill(SENTENCES[:3]) == 0
    from_cache = cache_last(SENTENCES[:3])
    direct = last(SENTENCES[:3])
    np.testing.assert_allclose(from_cache.hidden_states.numpy(), direct.hidden_states.numpy(), atol=1e-6)
    assert from_cache.tokens == direct.tokens
    assert cache_last.path("the air is clean") != cache_last.path("The air is clean.")
    assert not np.allclose(cache_first(SENTENCES[:1]).hidden_states.numpy(), from_cache.hidden_states[:1].numpy())


def test_teacher_cache_never_serves_states_of_other_weights_or_truncation(tmp_path):
    from modeling_uot_ctc.teacher import TeacherStateCache, TextTeacher

    folder = write_teacher(str(tmp_path / "teacher"), seed=0)
    old = TeacherStateCache(TextTeacher(folder), tmp_path / "cache")
    stale = old(SENTENCES[:2]).hidden_states
    write_teacher(folder, seed=1)  # new weights under the same path and name
    retrained = TextTeacher(folder)
    new = TeacherStateCache(retrained, tmp_path / "cache")
    assert new.folder != old.folder
    torch.testing.assert_close(new(SENTENCES[:2]).hidden_states, retrained(SENTENCES[:2]).hidden_states)
    assert not torch.allclose(new(SENTENCES[:2]).hidden_states, stale)
    truncated = TextTeacher(folder, max_length=4)
    short = TeacherStateCache(truncated, tmp_path / "cache")(SENTENCES[:2])
    assert short.hidden_states.shape[1] == 2  # 4 tokens, two of them [CLS] and [SEP]
    assert TeacherStateCache(truncated, tmp_path / "cache").folder not in (new.folder, old.folder)


def test_padding_frames_decode_to_nothing():
    from script_fixtures import TINY_MODEL
    from modeling_uot_ctc import Wav2Vec2ForCTCWithUOT, Wav2Vec2UOTConfig

    model = Wav2Vec2ForCTCWithUOT(Wav2Vec2UOTConfig(vocab_size=6, pad_token_id=0, **TINY_MODEL))
    input_lengths = torch.tensor([8000, 3200])
    n_frames = int(model._get_feat_extract_output_lengths(torch.tensor(8000)))
    short = int(model._get_feat_extract_output_lengths(torch.tensor(3200)))
    logits = torch.randn(2, n_frames, 6)
    logits[..., 3] += 10.0  # every frame, padding included, prefers character 3
    masked = script.blank_padding_frames(logits, input_lengths, model)
    ids = masked.argmax(-1)
    assert torch.equal(masked[0], logits[0]) and torch.equal(masked[1, :short], logits[1, :short])
    assert (ids[1, short:] == 0).all() and short < n_frames


def test_same_seed_same_initial_acoustic_model_with_or_without_transfer(corpus, teacher, tmp_path):
    # Rows of the experiments compare seed by seed: the teacher and the adapter must not shift the encoder's draw.
    class Snapshot(TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, **kwargs):
            self.weights = {k: v.clone() for k, v in model.state_dict().items() if not k.startswith("kt_adapter")}

    snapshots = {}
    for aligner in ("none", "uot", "ot"):
        snapshots[aligner] = Snapshot()
        arguments = base_arguments(corpus, teacher, str(tmp_path / aligner), max_steps=1, aligner=aligner)
        script.main([a for a in arguments if a != "--do_eval"], callbacks=[snapshots[aligner]])
    reference = snapshots["none"].weights
    for aligner in ("uot", "ot"):
        weights = snapshots[aligner].weights
        assert weights.keys() == reference.keys()
        assert all(torch.equal(weights[k], reference[k]) for k in reference)


# Several processes, the plain export and the hub settings: the script's own decisions.


def test_unused_parameter_detection_under_activation_checkpointing():
    def decided(**settings):
        args = script.TrainingArguments(output_dir="unused", report_to="none", use_cpu=True, **settings)
        script.configure_unused_parameter_detection(args)
        return args.ddp_find_unused_parameters

    # The Trainer decides without checkpointing (it then looks); with it, the script makes DDP look.
    assert decided() is None
    assert decided(activation_checkpointing=True) is True
    assert decided(activation_checkpointing=True, ddp_find_unused_parameters=False) is False
    # Reentrant checkpointing cannot look; alone it is allowed, on several processes it is refused.
    reentrant = dict(activation_checkpointing=True, activation_checkpointing_kwargs={"use_reentrant": True})
    assert decided(**reentrant) is None
    args = script.TrainingArguments(output_dir="unused", report_to="none", use_cpu=True, **reentrant)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(type(args), "world_size", property(lambda self: 2))
        with pytest.raises(ValueError, match="use_reentrant"):
            script.configure_unused_parameter_detection(args)


def test_plain_export_arguments_are_checked_before_training(corpus, teacher, tmp_path):
    out = str(tmp_path / "out")
    with pytest.raises(ValueError, match="--plain_model_dir"):
        script.main(base_arguments(corpus, teacher, out, plain_hub_model_id="someone/x"))
    with pytest.raises(ValueError, match="must differ from --output_dir"):
        script.main(base_arguments(corpus, teacher, out, plain_model_dir=out))
    assert not os.path.exists(os.path.join(out, "model.safetensors"))


def test_prediction_blanks_padding_by_lengths_or_mask_and_carries_no_teacher(corpus, teacher, tmp_path):
    from script_fixtures import TINY_MODEL

    from modeling_uot_ctc import Wav2Vec2ForCTCWithUOT, Wav2Vec2UOTConfig

    tokenizer = build_char_tokenizer(folder=str(tmp_path))
    torch.manual_seed(0)
    model = Wav2Vec2ForCTCWithUOT(Wav2Vec2UOTConfig(
        vocab_size=len(tokenizer), pad_token_id=0, teacher_hidden_size=24, **TINY_MODEL
    )).eval()
    with torch.no_grad():
        model.lm_head.bias[5] = 50.0  # every frame, padding included, prefers character 5
    args = script.TrainingArguments(output_dir=str(tmp_path), report_to="none", use_cpu=True)
    trainer = script.UOTTrainer(model=model, args=args)
    lengths = torch.tensor([4000, 2400])
    n_valid = model._get_feat_extract_output_lengths(lengths)
    values = torch.randn(2, 4000) * (torch.arange(4000)[None, :] < lengths[:, None])
    labels = torch.tensor([[5, 6], [5, -100]])
    for inputs in (
        {"input_values": values, "input_lengths": lengths, "labels": labels},
        {"input_values": values, "attention_mask": (values != 0).long(), "labels": labels},
    ):
        _, logits, _ = trainer.prediction_step(model, inputs, prediction_loss_only=False)
        ids = logits.argmax(-1)
        assert (ids[1, n_valid[1] :] == 0).all() and (ids[1, : n_valid[1]] == 5).all() and (ids[0] == 5).all()

    # Training batches carry the teacher's states; evaluation and prediction batches do not.
    from modeling_uot_ctc.teacher import TeacherStateCache, TextTeacher

    extractor = Wav2Vec2FeatureExtractor(return_attention_mask=False)
    processor = script.Wav2Vec2Processor(feature_extractor=extractor, tokenizer=tokenizer)
    rows = [{"input_values": np.ones(n, np.float32), "labels": [5, 6], "normalised_text": SENTENCES[k],
             "input_length": n} for k, n in enumerate((1600, 2400, 2000))]
    dataset = datasets.Dataset.from_list(rows)
    states = TeacherStateCache(TextTeacher(teacher), tmp_path / "cache")
    args = script.TrainingArguments(output_dir=str(tmp_path), report_to="none", use_cpu=True,
                                    remove_unused_columns=False, per_device_train_batch_size=3,
                                    per_device_eval_batch_size=3)
    trainer = script.UOTTrainer(model=model, args=args, train_dataset=dataset, eval_dataset=dataset,
                                data_collator=script.DataCollatorCTCWithTeacher(processor, states))
    train_batch = next(iter(trainer.get_train_dataloader()))
    assert "teacher_hidden_states" in train_batch and "input_lengths" in train_batch
    for loader in (trainer.get_eval_dataloader(), trainer.get_test_dataloader(dataset)):
        batch = next(iter(loader))
        assert "teacher_hidden_states" not in batch and batch["input_lengths"].tolist() == [1600, 2400, 2000]


def test_hub_settings_reach_the_checkpoint_and_the_teacher(corpus, tmp_path, monkeypatch):
    """--cache_dir, --model_revision, --teacher_revision and --token reach every loader, offline from a hub cache."""
    from transformers import Wav2Vec2Config, Wav2Vec2Model

    from script_fixtures import TINY_MODEL
    from test_modeling import publish_in_hub_cache

    cache = str(tmp_path / "cache")
    encoders = {}
    for seed, ref in ((0, "main"), (1, "v2")):
        torch.manual_seed(seed)
        encoders[ref] = Wav2Vec2Model(Wav2Vec2Config(**TINY_MODEL))
        encoders[ref].save_pretrained(tmp_path / "w2v" / ref)
        Wav2Vec2FeatureExtractor(return_attention_mask=True).save_pretrained(tmp_path / "w2v" / ref)
        publish_in_hub_cache(cache, "someone/w2v", tmp_path / "w2v" / ref, str(seed) * 40, [ref])
        write_teacher(str(tmp_path / "teacher" / ref), seed=seed)
        publish_in_hub_cache(cache, "someone/teacher", tmp_path / "teacher" / ref, str(seed) * 40, [ref])
    seen = []
    for name in ("from_plain_wav2vec2",):
        original = getattr(script.Wav2Vec2ForCTCWithUOT, name)
        monkeypatch.setattr(script.Wav2Vec2ForCTCWithUOT, name,
                            lambda *a, _o=original, **k: seen.append(("model", k.get("token"))) or _o(*a, **k))
    teacher_class = script.TextTeacher
    monkeypatch.setattr(script, "TextTeacher",
                        lambda *a, **k: seen.append(("teacher", k.get("token"))) or teacher_class(*a, **k))

    class Snapshot(TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, **kwargs):
            self.weights = {k: v.clone() for k, v in model.wav2vec2.state_dict().items()}

    snapshot = Snapshot()
    argv = base_arguments(corpus, "someone/teacher", str(tmp_path / "out"), max_steps=1, model_config=None,
                          model_name_or_path="someone/w2v", model_revision="v2", teacher_revision="v2",
                          cache_dir=cache, token="secret", teacher_cache_dir=str(tmp_path / "states"))
    script.main([a for a in argv if a != "--do_eval"], callbacks=[snapshot])
    expected = encoders["v2"].state_dict()
    assert len(snapshot.weights) > 30 and set(snapshot.weights) <= set(expected)  # masked_spec_embed: not used here
    for key, value in snapshot.weights.items():
        assert torch.equal(value, expected[key]), key
    key = "encoder.layers.0.attention.q_proj.weight"
    assert not torch.equal(encoders["main"].state_dict()[key], expected[key])  # the revisions differ
    (folder,) = [f for f in (tmp_path / "states").iterdir()]
    described = json.loads((folder / "teacher.json").read_text())
    assert described["revision"] == "v2"
    assert described["fingerprint"] == script.TextTeacher(str(tmp_path / "teacher" / "v2")).fingerprint
    assert ("model", "secret") in seen and ("teacher", "secret") in seen


# The n-gram language model: built from the training transcripts, tuned on a split, reported beside greedy decoding.


def test_language_model_is_built_tuned_saved_and_reported_beside_greedy(corpus, teacher, tmp_path):
    import jiwer
    import kenlm
    from pyctcdecode import BeamSearchDecoderCTC
    from transformers import AutoProcessor

    from modeling_uot_ctc import Wav2Vec2ForCTCWithUOT
    from modeling_uot_ctc.data import decode_audio

    out = tmp_path / "out"
    results = script.main(base_arguments(
        corpus, teacher, str(out), max_steps=2, lm_text="train", lm_order=2, lm_tune_split_name="train",
        lm_alpha_grid=[0.0, 0.5], lm_beta_grid=[0.0, 1.0],
    ))
    training_text = SENTENCES[:8]  # write_corpus's training sentences, normalised as the labels are
    assert kenlm.Model(str(out / "language_model" / "2gram.bin")).order == 2
    unigrams = (out / "language_model" / "unigrams.txt").read_text().split()
    assert sorted(unigrams) == sorted({w for s in training_text for w in s.split()})
    attrs = json.loads((out / "language_model" / "attrs.json").read_text())
    assert (attrs["alpha"], attrs["beta"]) == (results["lm_alpha"], results["lm_beta"])
    assert results["lm_alpha"] in (0.0, 0.5) and results["lm_beta"] in (0.0, 1.0)

    # The figures, recomputed from the saved folder with pyctcdecode and jiwer directly, one file at a time.
    saved = json.load(open(out / "eval_results.json"))
    model = Wav2Vec2ForCTCWithUOT.from_pretrained(out).eval()
    processor = AutoProcessor.from_pretrained(out)
    decoder = BeamSearchDecoderCTC.load_from_dir(str(out))
    references, hypotheses, greedy_hypotheses = [], [], []
    for k, sentence in enumerate(SENTENCES[8:]):
        audio = decode_audio(os.path.join(corpus, "test", f"test_{k:03d}.wav"))
        with torch.no_grad():
            logits = model(processor(audio, sampling_rate=16_000, return_tensors="pt").input_values).logits[0]
        hypotheses.append(decoder.decode(torch.log_softmax(logits, -1).numpy(), beam_width=32))
        greedy_hypotheses.append(processor.tokenizer.decode(logits.argmax(-1)))
        references.append(sentence)
    assert saved["eval_wer_lm"] == pytest.approx(jiwer.wer(references, hypotheses))
    assert saved["eval_cer_lm"] == pytest.approx(jiwer.cer(references, hypotheses))
    # Greedy decoding of the same scores beside it, and the Trainer's batched greedy figures.
    assert saved["eval_wer_greedy"] == pytest.approx(jiwer.wer(references, greedy_hypotheses))
    assert saved["eval_cer_greedy"] == pytest.approx(jiwer.cer(references, greedy_hypotheses))
    assert "eval_wer" in saved and "eval_cer" in saved

    card = (out / "README.md").read_text()
    metrics = yaml.safe_load(card.split("---")[1])["model-index"][0]["results"][0]["metrics"]
    names = {m["name"]: m["value"] for m in metrics}
    assert names["WER with the n-gram language model"] == pytest.approx(round(saved["eval_wer_lm"], 4))
    assert names["WER"] == pytest.approx(round(saved["eval_wer"], 4))
    assert f"WER, greedy, each utterance alone: {round(saved['eval_wer_greedy'], 4)}" in card
    assert "python -m modeling_uot_ctc.transcribe" in card

    # The command-line entry decodes a file with the folder's language model, as the decoder above does.
    done = subprocess.run(
        [sys.executable, "-m", "modeling_uot_ctc.transcribe", str(out), os.path.join(corpus, "test", "test_000.wav")],
        capture_output=True, text=True, timeout=300, cwd=REPO, env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.splitlines()[-1] == f"{os.path.join(corpus, 'test', 'test_000.wav')}\t{hypotheses[0]}"


@pytest.mark.parametrize("flags, error, match", [
    (dict(lm_text="/no/such/file.txt"), FileNotFoundError, "no such file"),
    (dict(lm_text="train", lm_tune_split_name="test"), ValueError, "is the evaluation split"),
    (dict(lm_text="train", lm_tune_split_name="test[:2]"), ValueError, "is the evaluation split"),
    (dict(lm_tune_split_name="train"), ValueError, "give --lm_text too"),
    (dict(lm_text="train", lm_tune_split_name="train", lm_tune_file="valid.csv"), ValueError, "not both"),
    (dict(lm_text="train", lm_tune_split_name="train", train_file="train.csv"), ValueError, "--lm_tune_file"),
])
def test_language_model_arguments_are_checked_before_training(corpus, teacher, tmp_path, flags, error, match):
    with pytest.raises(error, match=match):
        script.main(base_arguments(corpus, teacher, str(tmp_path / "out"), **flags))
    assert not (tmp_path / "out" / "model.safetensors").exists()


def test_language_model_is_refused_with_sharded_training(tmp_path):
    from types import SimpleNamespace

    text = tmp_path / "text.txt"
    text.write_text("a sentence\n")
    decoding = script.DecodingArguments(lm_text=str(text))
    data = script.DataTrainingArguments(data_dir=str(tmp_path))
    for sharding in (dict(fsdp=["full_shard"], deepspeed=None), dict(fsdp=[], deepspeed="ds_config.json")):
        training = SimpleNamespace(do_train=True, process_index=0, **sharding)
        with pytest.raises(ValueError, match="FSDP or DeepSpeed"):
            script.check_decoding_arguments(decoding, data, training)


def test_the_vocabulary_leaves_out_the_language_model_tuning_split(tmp_path):
    raw = datasets.DatasetDict({
        "train": datasets.Dataset.from_dict({"normalised_text": ["ab"]}),
        "eval": datasets.Dataset.from_dict({"normalised_text": ["bc"]}),
        "lm_tune": datasets.Dataset.from_dict({"normalised_text": ["xyz"]}),
    })
    model_args, data_args = script.ModelArguments(), script.DataTrainingArguments(data_dir=str(tmp_path))
    tokenizer = script.build_tokenizer(raw, model_args, data_args, script.TransferArguments(), str(tmp_path))
    assert {"a", "b", "c"} <= set(tokenizer.get_vocab()) and not {"x", "y", "z"} & set(tokenizer.get_vocab())


def test_the_transport_plan_is_drawn_into_tensorboard(corpus, teacher, tmp_path):
    import glob
    import io

    from PIL import Image
    from tensorboard.backend.event_processing.event_accumulator import IMAGES, EventAccumulator

    out = tmp_path / "out"
    script.main(base_arguments(corpus, teacher, str(out), max_steps=4, report_to="tensorboard", plan_picture_every=2))
    events = glob.glob(str(out / "runs" / "**" / "events.out.tfevents.*"), recursive=True)
    folders = {os.path.dirname(path) for path in events}
    assert len(folders) == 1
    accumulator = EventAccumulator(folders.pop(), size_guidance={IMAGES: 0}).Reload()
    assert "transfer/plan" in accumulator.Tags()["images"]
    images = accumulator.Images("transfer/plan")
    assert [image.step for image in images] == [2, 4]  # every second logging step (one a step here)
    picture = Image.open(io.BytesIO(images[-1].encoded_image_string)).convert("RGB")
    assert picture.size[0] > 100 and len(picture.getcolors(maxcolors=1 << 20)) > 20  # a drawing, not a blank
    assert not (out / "plans").exists()  # the picture lives in the event file only
    assert "train/ctc_loss" in accumulator.Tags()["scalars"]  # beside the Trainer's own scalars


# A homophone corpus: the evaluation reports how often the marked words are spelled right.


def test_compute_metrics_adds_the_homophone_accuracy_of_the_marked_words(tmp_path):
    from transformers import EvalPrediction, Wav2Vec2CTCTokenizer

    vocab = {"<pad>": 0, "<unk>": 1, "|": 2, **{c: 3 + k for k, c in enumerate("abdeghiknortwy")}}
    (tmp_path / "vocab.json").write_text(json.dumps(vocab))
    tokenizer = Wav2Vec2CTCTokenizer(str(tmp_path / "vocab.json"), bos_token=None, eos_token=None)
    references = ["the knight rode by", "we wait here"]
    hypotheses = ["the night rode by", "we wait here"]  # no doubled letters: CTC decoding would merge them

    def ids(texts):
        encoded = [tokenizer(text).input_ids for text in texts]
        width = max(map(len, encoded))
        return np.array([row + [-100] * (width - len(row)) for row in encoded])

    # Marked by transcript: the evaluation's batches come grouped by length, not in dataset order.
    compute = script.build_compute_metrics(tokenizer, ["wer"], homophones={"we wait here": [1],
                                                                            "the knight rode by": [1]})
    results = compute(EvalPrediction(predictions=ids(hypotheses), label_ids=ids(references)))
    # Worked by hand: knight misspelt, wait right; the control words (4 or 6 letters, not marked) rode and here right.
    assert results["homophone_accuracy"] == 0.5 and results["homophone_words"] == 2
    assert results["homophone_control_accuracy"] == 1.0
    assert results["wer"] == pytest.approx(1 / 7)
    # Another order of the same pairs gives the same figures.
    again = compute(EvalPrediction(predictions=ids(hypotheses[::-1]), label_ids=ids(references[::-1])))
    assert (again["homophone_accuracy"], again["homophone_words"]) == (0.5, 2)
    # A transcript the marks do not hold: no homophone figures, the rest still reported.
    other = compute(EvalPrediction(predictions=ids(["we go"]), label_ids=ids(["we go"])))
    assert "homophone_accuracy" not in other and other["wer"] == 0.0


def test_one_transcript_marked_two_ways_is_refused():
    import datasets

    eval_split = datasets.Dataset.from_dict({"normalised_text": ["we wait here", "we wait here"],
                                             "homophones": ["[1]", "[2]"]})
    with pytest.raises(ValueError, match="twice"):
        script.homophone_positions(datasets.DatasetDict({"eval": eval_split}))
    eval_split = datasets.Dataset.from_dict({"normalised_text": ["we wait here", "a b"], "homophones": ["[1]", ""]})
    assert script.homophone_positions(datasets.DatasetDict({"eval": eval_split})) == {"we wait here": [1], "a b": []}


def test_the_evaluation_reads_the_homophone_marks_of_the_data(corpus, teacher, tmp_path):
    import csv

    marked = tmp_path / "corpus"
    shutil.copytree(corpus, marked)
    path = marked / "test" / "metadata.csv"
    rows = list(csv.DictReader(open(path)))
    # One marked word, the last of the one four-word sentence: handed to any other sentence, it would not fit.
    for row, positions in zip(rows, ([], [], [], [3])):
        row["homophones"] = json.dumps(positions)
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    results = script.main(base_arguments(str(marked), teacher, str(tmp_path / "out"), max_steps=1,
                                         train_sampling_strategy="group_by_length", per_device_eval_batch_size=1))
    assert rows[3]["text"] == "KEEP THE LIGHT ON."
    assert results["eval_homophone_words"] == 1
    assert 0.0 <= results["eval_homophone_accuracy"] <= 1.0
