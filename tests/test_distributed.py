"""Two real processes (gloo on the CPU) training together, as users launch the script on several GPUs.

Each rank records what it did (tests/distributed_run.py); the tests prove from those records that two ranks trained
in every step: world size 2, different utterances on each rank, and identical weights at the end, which only the
averaging of both ranks' gradients can give.
"""

import json
import os
import socket
import subprocess
import sys
import textwrap

import numpy as np
import torch
import yaml
from transformers import Wav2Vec2Config, Wav2Vec2FeatureExtractor, Wav2Vec2ForPreTraining

from script_fixtures import TINY_MODEL, base_arguments, speech_like

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUNNER = os.path.join(REPO, "tests", "distributed_run.py")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def launch(launcher: list, argv: list, cwd) -> None:
    env = {**os.environ, "PYTHONPATH": REPO, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", *launcher, RUNNER, *argv], cwd=cwd, env=env,
                          stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-6000:]


def two_ranks_trained(record_dir, steps: int, forwards_per_step: int) -> list:
    """Assert that two ranks trained together for `steps` optimiser steps; returns both ranks' records."""
    records = [json.load(open(os.path.join(record_dir, f"rank{rank}.json"))) for rank in (0, 1)]
    for record in records:
        assert record["world_size"] == 2 and record["global_step"] == steps
        assert len(record["forwards"]) == steps * forwards_per_step
    # The ranks see different utterances in every forward pass (the distributed sampler splits each batch) ...
    for first, second in zip(records[0]["forwards"], records[1]["forwards"]):
        assert not {tuple(row) for row in first["labels"]} & {tuple(row) for row in second["labels"]}
    # ... and end with the same weights, which they left behind: their gradients were averaged in every step.
    assert records[0]["initial_weights"] == records[1]["initial_weights"]
    assert records[0]["final_weights"] == records[1]["final_weights"] != records[0]["initial_weights"]
    return records


def test_accelerate_launch_trains_on_two_cpu_processes(corpus, teacher, tmp_path):
    # On a machine without GPUs, `accelerate launch --cpu --num_processes 2` starts a single process;
    # --multi_gpu is what starts torch.distributed's launcher, which runs on the CPU with gloo under --use_cpu.
    argv = base_arguments(corpus, teacher, str(tmp_path / "out"), max_steps=3, per_device_train_batch_size=2)
    launcher = ["accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port())]
    launch(launcher, [str(tmp_path / "ranks"), *argv], tmp_path)
    records = two_ranks_trained(tmp_path / "ranks", steps=3, forwards_per_step=1)
    assert all(forward["transfer_ran"] for record in records for forward in record["forwards"])
    state = json.load(open(tmp_path / "out" / "trainer_state.json"))
    assert state["global_step"] == 3
    assert "eval_wer" in json.load(open(tmp_path / "out" / "eval_results.json"))


def write_base_like_checkpoint(folder) -> str:
    """A tiny random checkpoint shaped like facebook/wav2vec2-base: group norm in the front end, no stable layer
    norm, a pretraining head and no CTC head, and a feature extractor that returns no attention mask."""
    shape = {key: value for key, value in TINY_MODEL.items() if key != "feat_extract_norm"}
    config = Wav2Vec2Config(**shape, feat_extract_norm="group", do_stable_layer_norm=False, mask_time_prob=0.05,
                            num_codevectors_per_group=8, codevector_dim=16, proj_codevector_dim=16)
    torch.manual_seed(0)
    Wav2Vec2ForPreTraining(config).save_pretrained(folder)
    Wav2Vec2FeatureExtractor(feature_size=1, sampling_rate=16_000, padding_value=0.0, do_normalize=True,
                             return_attention_mask=False).save_pretrained(folder)
    return str(folder)


def test_librispeech_recipe_rehearsal_on_two_processes_then_a_plain_checkpoint(corpus, teacher, tmp_path):
    """The path of a real user, small: a wav2vec2-base-shaped checkpoint, the LibriSpeech recipe's settings (bf16
    autocast, emulated where the CPU lacks it; activation checkpointing, transfer warm-up, layerdrop, gradient
    accumulation), two real processes, then the stock pipeline on the exported plain checkpoint in a process that knows only transformers."""
    checkpoint = write_base_like_checkpoint(tmp_path / "wav2vec2-base-like")
    with open(os.path.join(REPO, "configs", "librispeech_clean100.yaml")) as handle:
        recipe = yaml.safe_load(handle)
    for key in ("dataset_name", "dataset_config_name", "train_split_name", "eval_split_name", "text_column_name",
                "num_train_epochs", "report_to", "dataloader_num_workers"):
        recipe.pop(key)
    recipe.update(
        model_name_or_path=checkpoint, data_dir=corpus, eval_split_name="test", teacher_name_or_path=teacher,
        teacher_cache_dir=str(tmp_path / "teacher_cache"), output_dir=str(tmp_path / "out"),
        plain_model_dir=str(tmp_path / "plain"), max_steps=4, kt_warmup_steps=2, layerdrop=0.5,
        per_device_train_batch_size=2, per_device_eval_batch_size=2, warmup_steps=0, learning_rate=1e-3,
        logging_steps=1, save_strategy="no", report_to="none", use_cpu=True,
        bf16=True,
    )
    config_file = tmp_path / "recipe.yaml"
    config_file.write_text(yaml.safe_dump(recipe))
    launcher = ["torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port())]
    launch(launcher, [str(tmp_path / "ranks"), str(config_file)], tmp_path)

    accumulation = recipe["gradient_accumulation_steps"]
    records = two_ranks_trained(tmp_path / "ranks", steps=4, forwards_per_step=accumulation)
    for record in records:
        assert record["activation_checkpointing"]
        forwards = record["forwards"]
        # No attention mask, as wav2vec2-base's extractor gives none: the lengths travel beside the audio.
        assert all(f["input_lengths"] and not f["attention_mask"] for f in forwards)
        assert all(f["head_dtype"] == "torch.bfloat16" for f in forwards)  # bf16 autocast
        # The transfer waits kt_warmup_steps optimiser steps, then runs in every forward pass.
        assert [f["transfer_ran"] for f in forwards] == [False] * 2 * accumulation + [True] * 2 * accumulation
    saved = json.load(open(tmp_path / "out" / "config.json"))
    assert saved["layerdrop"] == 0.5 and saved["feat_extract_norm"] == "group"

    # The plain export, in a fresh process that imports nothing of this project.
    audio = speech_like("open the door", np.random.default_rng(3))
    np.save(tmp_path / "audio.npy", audio)
    program = textwrap.dedent(
        f"""
        import json, sys
        import numpy as np
        from transformers import pipeline
        asr = pipeline("automatic-speech-recognition", model={str(tmp_path / "plain")!r})
        result = dict(text=asr(np.load({str(tmp_path / "audio.npy")!r}))["text"], model_class=type(asr.model).__name__,
                      package_imported=any(name.startswith("modeling_uot_ctc") for name in sys.modules))
        print(json.dumps(result))
        """
    )
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    done = subprocess.run([sys.executable, "-c", program], cwd=tmp_path, env={**env, "HF_HUB_OFFLINE": "1"},
                          stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["model_class"] == "Wav2Vec2ForCTC" and not result["package_imported"]

    from transformers import Wav2Vec2Processor

    from modeling_uot_ctc import Wav2Vec2ForCTCWithUOT

    trained = Wav2Vec2ForCTCWithUOT.from_pretrained(tmp_path / "out").eval()
    processor = Wav2Vec2Processor.from_pretrained(tmp_path / "out")
    with torch.no_grad():
        logits = trained(processor(audio, sampling_rate=16_000, return_tensors="pt").input_values).logits
    assert result["text"] == processor.decode(logits.argmax(-1)[0])
    card = (tmp_path / "plain" / "README.md").read_text()
    assert "trust_remote_code" not in card and "Wav2Vec2ForCTC" in card
