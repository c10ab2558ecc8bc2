"""Tiny-config tests of Wav2Vec2ForCTCWithUOT, in the style of transformers' ModelTester."""

import json
import math
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from safetensors import safe_open
from transformers import (
    AutoConfig,
    AutoModelForCTC,
    Wav2Vec2Config,
    Wav2Vec2CTCTokenizer,
    Wav2Vec2FeatureExtractor,
    Wav2Vec2ForCTC,
    Wav2Vec2Model,
    Wav2Vec2Processor,
    pipeline,
)

from modeling_uot_ctc import Wav2Vec2ForCTCWithUOT, Wav2Vec2UOTConfig, solve_uot
from modeling_uot_ctc.cuda_graphs import TransferGraphs, padded_size
from modeling_uot_ctc.transfer import transfer_terms

TEACHER_WIDTH = 24
CHARACTERS = list("abcdefghijklmnopqrstuvwxyz'")


def tiny_config(**overrides):
    settings = dict(
        vocab_size=len(CHARACTERS) + 2,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=20,
        conv_dim=(32, 32, 32),
        conv_stride=(4, 4, 4),
        conv_kernel=(8, 8, 8),
        conv_bias=True,
        num_conv_pos_embeddings=16,
        num_conv_pos_embedding_groups=2,
        feat_extract_norm="layer",
        hidden_dropout=0.0,
        activation_dropout=0.0,
        attention_dropout=0.0,
        feat_proj_dropout=0.0,
        final_dropout=0.0,
        layerdrop=0.0,
        mask_time_prob=0.0,
        pad_token_id=0,
        ctc_loss_reduction="mean",
        teacher_hidden_size=TEACHER_WIDTH,
        kt_weight=0.7,
        rho_frames=0.5,
        alignment_tol=1e-7,
        alignment_max_iter=2000,
    )
    settings.update(overrides)
    return Wav2Vec2UOTConfig(**settings)


def make_batch(lengths=(2400, 1800, 1200), label_lengths=(6, 4, 3), token_counts=(5, 3, 4), seed=0):
    gen = torch.Generator().manual_seed(seed)
    batch = len(lengths)
    input_values = torch.zeros(batch, max(lengths))
    attention_mask = torch.zeros(batch, max(lengths), dtype=torch.long)
    labels = torch.full((batch, max(label_lengths)), -100, dtype=torch.long)
    teacher = torch.randn(batch, max(token_counts), TEACHER_WIDTH, generator=gen)
    teacher_mask = torch.zeros(batch, max(token_counts), dtype=torch.long)
    for k, (n, m, t) in enumerate(zip(lengths, label_lengths, token_counts)):
        input_values[k, :n] = torch.randn(n, generator=gen)
        attention_mask[k, :n] = 1
        labels[k, :m] = torch.randint(2, len(CHARACTERS) + 2, (m,), generator=gen)
        teacher_mask[k, :t] = 1
    return dict(
        input_values=input_values,
        attention_mask=attention_mask,
        labels=labels,
        teacher_hidden_states=teacher,
        teacher_attention_mask=teacher_mask,
    )


def slice_example(batch, k, lengths=(2400, 1800, 1200), label_lengths=(6, 4, 3), token_counts=(5, 3, 4)):
    return dict(
        input_values=batch["input_values"][k : k + 1, : lengths[k]],
        attention_mask=batch["attention_mask"][k : k + 1, : lengths[k]],
        labels=batch["labels"][k : k + 1, : label_lengths[k]],
        teacher_hidden_states=batch["teacher_hidden_states"][k : k + 1, : token_counts[k]],
        teacher_attention_mask=batch["teacher_attention_mask"][k : k + 1, : token_counts[k]],
    )


def without_teacher(batch):
    return {k: v for k, v in batch.items() if not k.startswith("teacher")}


def plain_twin(model):
    """A Wav2Vec2ForCTC with the same weights (everything but the adapter)."""
    plain = Wav2Vec2ForCTC(Wav2Vec2Config(**{k: v for k, v in model.config.to_dict().items() if k != "model_type"}))
    missing, unexpected = plain.load_state_dict(model.state_dict(), strict=False)
    assert not missing and all(key.startswith("kt_adapter") for key in unexpected)
    return plain.eval()


@pytest.fixture
def model():
    torch.manual_seed(0)
    return Wav2Vec2ForCTCWithUOT(tiny_config()).eval()


def test_loss_is_ctc_plus_weighted_transfer(model):
    out = model(**make_batch(), output_alignments=True)
    assert out.kt_loss is not None and out.kt_loss > 0
    torch.testing.assert_close(out.loss, out.ctc_loss + 0.7 * out.kt_loss, rtol=0, atol=1e-6)
    assert out.logits.shape[:2] == out.alignments.shape[:2] and out.alignments.shape[2] == 5
    assert out.token_coverage.item() == pytest.approx(1.0)
    assert 0.0 <= out.dropped_frame_fraction.item() <= 1.0
    assert out.transported_mass.item() == pytest.approx(1.0, abs=1e-5)  # tokens hard: mass 1 per example
    assert out.alignment_converged.item() == 1.0


def test_converged_fraction_reports_a_short_iteration_budget():
    torch.manual_seed(7)
    model = Wav2Vec2ForCTCWithUOT(tiny_config(alignment_max_iter=1, alignment_tol=1e-9)).eval()
    assert model(**make_batch()).alignment_converged.item() == 0.0


@pytest.mark.parametrize("switch_off", ["no_teacher", "kt_weight_0", "aligner_none"])
def test_without_transfer_it_is_wav2vec2_for_ctc(switch_off):
    torch.manual_seed(1)
    overrides = {"kt_weight_0": dict(kt_weight=0.0), "aligner_none": dict(aligner="none")}.get(switch_off, {})
    model = Wav2Vec2ForCTCWithUOT(tiny_config(**overrides)).eval()
    batch = make_batch()
    ours = model(**(without_teacher(batch) if switch_off == "no_teacher" else batch))
    theirs = plain_twin(model)(**without_teacher(batch))
    torch.testing.assert_close(ours.logits, theirs.logits, rtol=0, atol=1e-6)
    torch.testing.assert_close(ours.loss, theirs.loss, rtol=0, atol=1e-6)
    assert ours.kt_loss is None and ours.alignments is None and ours.token_coverage is None


def test_transfer_loss_reaches_the_encoder(model):
    model.train()
    out = model(**make_batch())
    out.kt_loss.backward()
    encoder_grads = [p.grad for name, p in model.named_parameters() if name.startswith("wav2vec2.encoder.layers.0")]
    assert any(g is not None and g.abs().sum() > 0 for g in encoder_grads)
    assert model.kt_adapter.weight.grad.abs().sum() > 0
    assert model.lm_head.weight.grad is None or model.lm_head.weight.grad.abs().sum() == 0


def test_training_lowers_both_losses():
    torch.manual_seed(2)
    model = Wav2Vec2ForCTCWithUOT(tiny_config()).train()
    batch = make_batch()
    optimiser = torch.optim.AdamW(model.parameters(), lr=3e-3)
    first = None
    for _ in range(30):
        out = model(**batch)
        first = first or (out.ctc_loss.item(), out.kt_loss.item())
        optimiser.zero_grad()
        out.loss.backward()
        optimiser.step()
    with torch.no_grad():
        last = model.eval()(**batch)
    assert last.ctc_loss.item() < 0.9 * first[0]
    assert last.kt_loss.item() < 0.9 * first[1]


@pytest.mark.parametrize("kt_loss_type", ["cosine", "cosine+transport"])
def test_each_example_in_a_padded_batch_scores_as_alone(kt_loss_type):
    """Documented reduction: each loss is the mean over examples of a per-example quantity (CTC with
    ctc_loss_reduction="mean" divides by the label length; the transfer averages over the example's tokens)."""
    torch.manual_seed(3)
    model = Wav2Vec2ForCTCWithUOT(tiny_config(kt_loss_type=kt_loss_type)).eval()
    batch = make_batch()
    together = model(**batch)
    alone = [model(**slice_example(batch, k)) for k in range(3)]
    torch.testing.assert_close(together.ctc_loss, torch.stack([o.ctc_loss for o in alone]).mean(), rtol=0, atol=1e-5)
    torch.testing.assert_close(together.kt_loss, torch.stack([o.kt_loss for o in alone]).mean(), rtol=0, atol=1e-5)


def test_half_precision_training_gives_finite_losses_with_padded_teachers():
    torch.manual_seed(6)
    model = Wav2Vec2ForCTCWithUOT(tiny_config()).train()
    batch = make_batch(token_counts=(5, 3, 4))  # padded teacher positions
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(**batch)
    assert torch.isfinite(out.loss) and torch.isfinite(out.kt_loss)
    frames = torch.randn(3, 20, 16).half()
    kt_loss, _, _ = model.half()._transfer_loss(
        frames, None, batch["teacher_hidden_states"].half(), batch["teacher_attention_mask"]
    )
    assert torch.isfinite(kt_loss) and kt_loss.dtype == torch.float32


def test_drop_in_for_the_parent_with_config_flags():
    torch.manual_seed(7)
    model = Wav2Vec2ForCTCWithUOT(tiny_config(output_hidden_states=True)).eval()
    batch = without_teacher(make_batch())
    ours, theirs = model(**batch), plain_twin(model)(**batch)
    assert ours.hidden_states is not None and len(ours.hidden_states) == len(theirs.hidden_states)
    as_tuple = model(**batch, return_dict=False)
    torch.testing.assert_close(as_tuple[0], theirs.loss)
    torch.testing.assert_close(as_tuple[1], theirs.logits)
    assert isinstance(as_tuple[2], tuple)  # hidden states third, as in Wav2Vec2ForCTC


def test_inner_layer_tap_is_refused_where_it_cannot_work():
    with pytest.raises(ValueError, match="add_adapter"):
        tiny_config(kt_encoder_layer=1, add_adapter=True)
    model = Wav2Vec2ForCTCWithUOT(tiny_config(kt_encoder_layer=1, layerdrop=0.5)).train()
    with pytest.raises(ValueError, match="layerdrop"):
        model(**make_batch())
    model = Wav2Vec2ForCTCWithUOT(tiny_config(kt_encoder_layer=1)).train()
    assert model(**make_batch()).kt_loss is not None


def test_warmup_is_a_schedule_passed_to_forward():
    model = Wav2Vec2ForCTCWithUOT(tiny_config(kt_warmup_steps=10)).eval()
    assert [model.transfer_scale(step) for step in (None, 0, 9, 10, 11)] == [1.0, 0.0, 0.0, 1.0, 1.0]
    batch = make_batch()
    waiting = model(**batch, transfer_scale=model.transfer_scale(3))
    assert waiting.kt_loss is None and waiting.token_coverage is None
    torch.testing.assert_close(waiting.loss, plain_twin(model)(**without_teacher(batch)).loss, rtol=0, atol=1e-6)
    full, half = model(**batch), model(**batch, transfer_scale=0.5)  # no step given: the transfer runs
    torch.testing.assert_close(half.kt_loss, full.kt_loss)
    torch.testing.assert_close(half.loss, full.ctc_loss + 0.5 * 0.7 * full.kt_loss, rtol=0, atol=1e-6)
    assert not hasattr(model, "training_step")  # no state that only one caller knows how to set


def test_bad_inputs_are_rejected(model):
    batch = make_batch()
    with pytest.raises(ValueError, match="teacher_hidden_size"):
        model(**{**batch, "teacher_hidden_states": torch.randn(3, 5, TEACHER_WIDTH + 1)})
    with pytest.raises(ValueError, match="vocab_size"):
        model(**{**batch, "labels": torch.full((3, 2), 99)})
    with pytest.raises(ValueError, match="aligner"):
        Wav2Vec2ForCTCWithUOT(tiny_config(aligner="hungarian"))(**batch)
    with pytest.raises(ValueError, match="kt_adapter"):
        tiny_config(kt_adapter="transformer")
    unmasked = without_teacher(batch)
    del unmasked["attention_mask"]
    for lengths in (torch.tensor([2400, 1800]), torch.tensor([[2400], [1800], [1200]]), torch.tensor([2400.0, 1, 1])):
        with pytest.raises(ValueError, match="one integer per example"):
            model(**unmasked, input_lengths=lengths)
    for lengths in (torch.tensor([2401, 1800, 1200]), torch.tensor([2400, 0, 1200])):
        with pytest.raises(ValueError, match="counts audio samples"):
            model(**unmasked, input_lengths=lengths)


def test_config_fields_and_rho_conventions():
    config = tiny_config(matching_fraction=0.5, alignment_eps=0.2)
    assert config.rho_frames == pytest.approx(0.2)
    assert tiny_config(rho_frames=math.inf).rho_frames is None
    assert tiny_config().solver_settings["rho_tokens"] == math.inf
    assert json.loads(tiny_config().to_json_string())["rho_tokens"] is None  # strict JSON, no Infinity


@pytest.mark.parametrize("iterations", [0, -4, 2.5, True])
def test_graph_iterations_must_be_a_positive_integer(iterations):
    with pytest.raises(ValueError, match="alignment_graph_iterations"):
        tiny_config(alignment_graph_iterations=iterations)


def test_cuda_graphs_refuse_the_unrolled_gradient():
    with pytest.raises(ValueError, match="kt_cuda_graphs needs alignment_grad_mode='detach'"):
        tiny_config(kt_cuda_graphs=True, alignment_grad_mode="unrolled")


def test_copies_of_a_model_start_without_graphs():
    import copy
    import functools
    import pickle


    model = Wav2Vec2ForCTCWithUOT(tiny_config(kt_cuda_graphs=True))
    terms = functools.partial(transfer_terms, aligner=solve_uot, solver_settings={}, kt_loss_type="cosine")
    model._transfer_graphs = TransferGraphs(terms)
    model._transfer_graphs.graphs["a shape"] = lambda: None  # stands in for a captured graph, which cannot be pickled
    # (Wav2Vec2 itself pickles only through its state dict: its positional convolution is a parametrized module.)
    for twin in (copy.deepcopy(model)._transfer_graphs, pickle.loads(pickle.dumps(model._transfer_graphs))):
        assert twin is not model._transfer_graphs and not twin.graphs and twin.terms.keywords == terms.keywords
    assert len(model._transfer_graphs.graphs) == 1


def test_save_and_load_round_trip(model, tmp_path):
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as weights:
        keys = list(weights.keys())
    assert all(k.split(".")[0] in {"wav2vec2", "lm_head", "kt_adapter"} for k in keys)
    saved = json.loads((tmp_path / "config.json").read_text())
    for field in ("aligner", "alignment_eps", "rho_frames", "rho_tokens", "kt_weight", "kt_loss_type",
                  "kt_warmup_steps", "kt_adapter", "kt_encoder_layer", "teacher_hidden_size", "temporal_order_weight",
                  "alignment_max_iter", "alignment_tol", "alignment_grad_mode", "teacher_name_or_path",
                  "teacher_layer", "kt_cuda_graphs", "alignment_graph_iterations"):
        assert saved[field] == getattr(model.config, field)
    assert saved["auto_map"]["AutoModelForCTC"].endswith("Wav2Vec2ForCTCWithUOT")
    loaded = AutoModelForCTC.from_pretrained(tmp_path).eval()
    assert type(loaded) is Wav2Vec2ForCTCWithUOT
    batch = make_batch()
    a, b = model(**batch), loaded(**batch)
    # Exact on every machine: the same weights run through the same kernels in one process.
    torch.testing.assert_close(a.logits, b.logits, rtol=0, atol=0)
    torch.testing.assert_close(a.loss, b.loss, rtol=0, atol=0)


def test_auto_classes_know_the_model():
    settings = {k: v for k, v in tiny_config().to_dict().items() if k != "model_type"}
    config = AutoConfig.for_model("wav2vec2-uot", **settings)
    assert isinstance(config, Wav2Vec2UOTConfig)
    assert type(AutoModelForCTC.from_config(config)) is Wav2Vec2ForCTCWithUOT


@pytest.mark.parametrize("source", ["ctc_folder", "base_folder", "in_memory"])
def test_conversion_from_plain_wav2vec2_keeps_every_encoder_weight(source, tmp_path):
    torch.manual_seed(4)
    plain_config = Wav2Vec2Config(**{k: v for k, v in tiny_config().to_dict().items() if k != "model_type"})
    plain = Wav2Vec2ForCTC(plain_config) if source != "base_folder" else Wav2Vec2Model(plain_config)
    if source == "in_memory":
        converted = Wav2Vec2ForCTCWithUOT.from_plain_wav2vec2(plain, teacher_hidden_size=TEACHER_WIDTH)
    else:
        plain.save_pretrained(tmp_path)
        converted = Wav2Vec2ForCTCWithUOT.from_plain_wav2vec2(str(tmp_path), teacher_hidden_size=TEACHER_WIDTH)
    assert isinstance(converted.config, Wav2Vec2UOTConfig) and converted.config.teacher_hidden_size == TEACHER_WIDTH
    ours = converted.state_dict()
    for key, value in plain.state_dict().items():
        assert torch.equal(ours[key if source != "base_folder" else "wav2vec2." + key], value), key
    assert converted.kt_adapter.weight.shape == (TEACHER_WIDTH, 16)


def save_asr_folder(model, folder):
    vocab = {"<pad>": 0, "|": 1, **{c: i + 2 for i, c in enumerate(CHARACTERS)}}
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    tokenizer = Wav2Vec2CTCTokenizer(
        str(folder / "vocab.json"), unk_token="<pad>", pad_token="<pad>", word_delimiter_token="|",
        bos_token=None, eos_token=None,
    )
    extractor = Wav2Vec2FeatureExtractor(sampling_rate=16_000, do_normalize=True, return_attention_mask=True)
    Wav2Vec2Processor(feature_extractor=extractor, tokenizer=tokenizer).save_pretrained(folder)
    model.save_pretrained(folder)
    return tokenizer, extractor


def greedy_transcript(model, extractor, tokenizer, audio):
    inputs = extractor(audio, sampling_rate=16_000, return_tensors="pt")
    with torch.no_grad():
        logits = model(inputs.input_values, attention_mask=inputs.attention_mask).logits
    return tokenizer.decode(logits.argmax(-1)[0])


def biased_model(seed=5):
    """A tiny model whose untrained head still emits a few characters rather than only blanks."""
    torch.manual_seed(seed)
    model = Wav2Vec2ForCTCWithUOT(tiny_config()).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(40.0)
        model.lm_head.bias[0] = -1.0
    return model


def test_stock_pipeline_with_the_package_imported(tmp_path):
    model = biased_model()
    tokenizer, extractor = save_asr_folder(model, tmp_path)
    audio = np.random.default_rng(0).standard_normal(16_000 * 2).astype(np.float32)
    asr = pipeline("automatic-speech-recognition", model=str(tmp_path), device=-1)
    text = asr(audio)["text"]
    assert text and text == greedy_transcript(model, extractor, tokenizer, audio)
    chunked = asr(audio, chunk_length_s=1.0, stride_length_s=0.25)
    assert isinstance(chunked["text"], str) and chunked["text"]
    stamped = asr(audio, return_timestamps="char")
    assert stamped["chunks"] and all({"text", "timestamp"} <= set(c) for c in stamped["chunks"])
    assert "".join(c["text"] for c in stamped["chunks"]).replace(" ", "") == text.replace(" ", "")


def test_stock_pipeline_in_a_fresh_process_with_remote_code(tmp_path):
    model = biased_model()
    tokenizer, extractor = save_asr_folder(model, tmp_path / "model")
    audio = np.random.default_rng(1).standard_normal(16_000 * 2).astype(np.float32)
    np.save(tmp_path / "audio.npy", audio)
    script = textwrap.dedent(
        f"""
        import json, sys
        import numpy as np
        from transformers import pipeline
        asr = pipeline("automatic-speech-recognition", model={str(tmp_path / "model")!r}, trust_remote_code=True)
        audio = np.load({str(tmp_path / "audio.npy")!r})
        from transformers import AutoModel
        encoder = AutoModel.from_pretrained({str(tmp_path / "model")!r}, trust_remote_code=True)
        result = dict(
            text=asr(audio)["text"],
            chunked=asr(audio, chunk_length_s=1.0)["text"],
            model_class=type(asr.model).__name__,
            encoder_class=type(encoder).__name__,
            package_imported="modeling_uot_ctc" in sys.modules,
        )
        print(json.dumps(result))
        """
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["HF_HUB_OFFLINE"] = "1"
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, env=env, stdin=subprocess.DEVNULL, capture_output=True,
        text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["model_class"] == "Wav2Vec2ForCTCWithUOT" and result["encoder_class"] == "Wav2Vec2UOTModel"
    assert result["package_imported"] is False
    assert result["text"] == greedy_transcript(model, extractor, tokenizer, audio)
    assert isinstance(result["chunked"], str)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_transfer_loss_never_waits_for_the_gpu():
    """The transfer (adapter, cost, solver, pooling, loss, diagnostics and their backward) queues its work without
    reading anything back, so that the host can launch it while the GPU still runs the encoder."""
    torch.manual_seed(0)
    model = Wav2Vec2ForCTCWithUOT(tiny_config(alignment_tol=1e-5)).cuda().train()
    batch = {key: value.cuda() for key, value in make_batch().items()}
    model(**batch).loss.backward()  # first calls may initialise things that synchronise
    hidden = model.wav2vec2(batch["input_values"], attention_mask=batch["attention_mask"]).last_hidden_state
    frame_mask = model._frame_mask(hidden.shape[1], batch["attention_mask"])
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # any operation that makes the host wait now raises
    try:
        kt_loss, plans, diagnostics = model._transfer_loss(
            hidden, frame_mask, batch["teacher_hidden_states"], batch["teacher_attention_mask"]
        )
        kt_loss.backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(kt_loss) and diagnostics["transported_mass"].item() == pytest.approx(1.0, abs=1e-4)


def test_graph_shapes_are_the_next_power_of_two_or_one_and_a_half_times_one():
    allowed = sorted({smallest * 2**k * f // 2 for smallest in (16,) for k in range(12) for f in (2, 3)})
    for size in range(1, 3000):
        expected = min(a for a in allowed if a >= size)
        assert padded_size(size, 16) == expected, size
    assert [padded_size(n, 64) for n in (1, 64, 65, 97, 129, 193, 500)] == [64, 64, 96, 128, 192, 256, 512]


def test_cuda_graph_setting_is_ignored_off_the_gpu():
    torch.manual_seed(5)
    eager = Wav2Vec2ForCTCWithUOT(tiny_config()).train()
    graphed = Wav2Vec2ForCTCWithUOT(tiny_config(kt_cuda_graphs=True)).train()
    graphed.load_state_dict(eager.state_dict())
    batch = make_batch()
    a, b = eager(**batch), graphed(**batch)
    # Exact on every machine: off the GPU both take the same eager path, kernel for kernel.
    torch.testing.assert_close(b.loss, a.loss, rtol=0, atol=0)
    assert graphed._transfer_graphs is None


def graphed_and_eager_twins(**overrides):
    torch.manual_seed(6)
    settings = dict(alignment_tol=1e-5, alignment_graph_iterations=400, **overrides)
    eager = Wav2Vec2ForCTCWithUOT(tiny_config(**settings)).cuda().train()
    graphed = Wav2Vec2ForCTCWithUOT(tiny_config(kt_cuda_graphs=True, **settings)).cuda().train()
    graphed.load_state_dict(eager.state_dict())
    return eager, graphed


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_graphed_transfer_matches_the_eager_one():
    """Same losses, diagnostics, plans and accumulated gradients, over batches that share a padded shape and one
    that needs another; two backward passes accumulate (the case that static gradient buffers would break)."""
    eager, graphed = graphed_and_eager_twins()
    batches = [
        make_batch(seed=0),
        make_batch(lengths=(2000, 2300, 900), label_lengths=(5, 6, 2), token_counts=(4, 5, 2), seed=1),
        make_batch(lengths=(16000, 9000, 12000), label_lengths=(9, 6, 8), token_counts=(20, 11, 17), seed=2),
    ]
    batches = [{key: value.cuda() for key, value in batch.items()} for batch in batches]
    # The first two batches share a padded shape: accumulated into the same gradients, then the third alone.
    for step in (batches[:2], batches[2:]):
        for model in (eager, graphed):
            model.zero_grad(set_to_none=True)
        kept_losses = []
        for batch in step:
            outputs = [model(**batch, output_alignments=True) for model in (eager, graphed)]
            for out in outputs:
                out.loss.backward()
            kept_losses.append((outputs[1].kt_loss, outputs[1].kt_loss.item()))
            a, b = outputs
            assert b.alignment_converged.item() == 1.0  # the eager solver's plans only where all converged
            names = ("loss", "kt_loss", "ctc_loss", "token_coverage", "dropped_frame_fraction", "transported_mass")
            for name in names:
                torch.testing.assert_close(getattr(b, name), getattr(a, name), rtol=1e-4, atol=1e-6, msg=name)
            torch.testing.assert_close(b.alignments, a.alignments, rtol=1e-4, atol=1e-7)
        for (name, p), q in zip(eager.named_parameters(), graphed.parameters()):
            if p.grad is not None:
                torch.testing.assert_close(q.grad, p.grad, rtol=1e-3, atol=1e-6, msg=name)
        for loss, value in kept_losses:  # outputs are copies: a later replay leaves them alone
            assert loss.item() == value
    graphs = graphed._transfer_graphs
    assert not graphs.failed and len(graphs.graphs) == 2


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_graphed_transfer_refuses_a_backward_whose_activations_were_replaced():
    _, model = graphed_and_eager_twins()
    first = model(**{key: value.cuda() for key, value in make_batch(seed=0).items()})
    second = model(**{key: value.cuda() for key, value in make_batch(seed=3).items()})  # same padded shape
    with pytest.raises(RuntimeError, match="before the backward pass of an earlier forward pass"):
        first.loss.backward()
    second.loss.backward()  # the latest forward pass is still fine
    assert model.kt_adapter.weight.grad.abs().sum() > 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_graphed_transfer_never_waits_for_the_gpu():
    _, model = graphed_and_eager_twins()
    batch = {key: value.cuda() for key, value in make_batch().items()}
    model(**batch).loss.backward()  # captures the graph, which synchronises
    hidden = model.wav2vec2(batch["input_values"], attention_mask=batch["attention_mask"]).last_hidden_state
    frame_mask = model._frame_mask(hidden.shape[1], batch["attention_mask"])
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # any operation that makes the host wait now raises
    try:
        kt_loss, _, diagnostics = model._transfer_loss(
            hidden, frame_mask, batch["teacher_hidden_states"], batch["teacher_attention_mask"]
        )
        kt_loss.backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert not model._transfer_graphs.failed and len(model._transfer_graphs.graphs) == 1
    assert torch.isfinite(kt_loss) and diagnostics["transported_mass"].item() == pytest.approx(1.0, abs=1e-4)


# What transformers' common model checks expect of a model, and the path from a plain checkpoint and back.


def test_output_flags_are_read_from_the_config_and_tuples_keep_the_parents_order():
    torch.manual_seed(8)
    config = tiny_config(output_attentions=True, output_hidden_states=True, attn_implementation="eager")
    model = Wav2Vec2ForCTCWithUOT(config).eval()
    plain = plain_twin(model)
    plain.set_attn_implementation("eager")
    plain.config.output_attentions = plain.config.output_hidden_states = True
    batch = without_teacher(make_batch())
    ours, theirs = model(**batch), plain(**batch)
    assert ours.attentions is not None and len(ours.attentions) == config.num_hidden_layers
    for a, b in zip(ours.attentions, theirs.attentions):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    ours_tuple, theirs_tuple = model(**batch, return_dict=False), plain(**batch, return_dict=False)
    assert len(ours_tuple) >= len(theirs_tuple) == 4  # loss, logits, hidden states, attentions
    for a, b in zip(ours_tuple, theirs_tuple):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    # An explicit flag still wins over the config, as in the parent.
    assert model(**batch, output_attentions=False).attentions is None


def test_the_bare_encoder_saves_and_loads_through_auto_model(model, tmp_path):
    from transformers import AutoModel

    from modeling_uot_ctc import Wav2Vec2UOTModel

    model.save_pretrained(tmp_path / "ctc")
    encoder = AutoModel.from_pretrained(tmp_path / "ctc").eval()
    assert type(encoder) is Wav2Vec2UOTModel and isinstance(encoder, Wav2Vec2Model)
    batch = make_batch()
    expected = model.wav2vec2(batch["input_values"], attention_mask=batch["attention_mask"]).last_hidden_state
    got = encoder(batch["input_values"], attention_mask=batch["attention_mask"]).last_hidden_state
    torch.testing.assert_close(got, expected, rtol=0, atol=0)  # same weights, same kernels: exact everywhere
    encoder.save_pretrained(tmp_path / "encoder")
    again = AutoModel.from_pretrained(tmp_path / "encoder").eval()
    assert type(again) is Wav2Vec2UOTModel
    torch.testing.assert_close(
        again(batch["input_values"]).last_hidden_state, encoder(batch["input_values"]).last_hidden_state
    )


def test_padding_without_an_attention_mask_is_not_taken_for_speech():
    """wav2vec2-base's feature extractor gives no attention mask: the batch says how long each utterance is with
    `input_lengths`, the encoder still sees the zero padding (as the parent does), and the losses stop at the end."""
    torch.manual_seed(9)
    model = Wav2Vec2ForCTCWithUOT(tiny_config(feat_extract_norm="group")).eval()
    lengths = (2400, 1800, 1200)
    batch = make_batch(lengths=lengths)
    mask = batch.pop("attention_mask")
    batch["input_values"] = batch["input_values"] * mask  # zero padding, as the feature extractor pads
    out = model(**batch, input_lengths=torch.tensor(lengths), output_alignments=True)
    torch.testing.assert_close(out.logits, plain_twin(model)(batch["input_values"]).logits, rtol=0, atol=1e-6)

    n_frames = model._get_feat_extract_output_lengths(torch.tensor(lengths))
    for k, valid in enumerate(n_frames.tolist()):
        assert (valid < out.alignments.shape[1]) == (k > 0)
        assert (out.alignments[k, valid:] == 0).all(), k
        assert out.alignments[k, :valid].sum() == pytest.approx(1.0, abs=1e-5)
    # The CTC loss of each utterance over its own frames, by torch's own CTC.
    log_probs = torch.log_softmax(out.logits, -1).transpose(0, 1)
    labels = batch["labels"]
    expected = torch.nn.functional.ctc_loss(
        log_probs, labels.clamp_min(0), n_frames, (labels >= 0).sum(-1), blank=0, reduction="mean"
    )
    torch.testing.assert_close(out.ctc_loss, expected, rtol=1e-6, atol=1e-6)
    # Without the lengths every frame counts, padding included: the plans then give it mass.
    unaware = model(**batch, output_alignments=True)
    assert unaware.alignments[2, n_frames[2] :].sum() > 0.05


def other_encoder_configs():
    from transformers import Data2VecAudioConfig, HubertConfig, Wav2Vec2ConformerConfig, WavLMConfig

    shape = dict(
        hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=20, conv_dim=(32, 32, 32),
        conv_stride=(4, 4, 4), conv_kernel=(8, 8, 8), num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=2,
        vocab_size=12,
    )
    return {cls.model_type: cls(**shape) for cls in (HubertConfig, WavLMConfig, Data2VecAudioConfig,
                                                     Wav2Vec2ConformerConfig)}


@pytest.mark.parametrize("model_type", ["hubert", "wavlm", "data2vec-audio", "wav2vec2-conformer"])
def test_conversion_refuses_other_encoders(model_type, tmp_path):
    from transformers import AutoModelForCTC as AutoCTC

    other = AutoCTC.from_config(other_encoder_configs()[model_type])
    with pytest.raises(ValueError, match=f"{model_type!r} model.*wav2vec 2.0 checkpoints only"):
        Wav2Vec2ForCTCWithUOT.from_plain_wav2vec2(other, teacher_hidden_size=TEACHER_WIDTH)
    other.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=f"{model_type!r} model.*wav2vec 2.0 checkpoints only"):
        Wav2Vec2ForCTCWithUOT.from_plain_wav2vec2(str(tmp_path), teacher_hidden_size=TEACHER_WIDTH)
    with pytest.raises(ValueError, match="wav2vec 2.0 checkpoints only"):
        Wav2Vec2ForCTCWithUOT.from_plain_wav2vec2(torch.nn.Linear(2, 2))


def publish_in_hub_cache(cache_dir, repo_id, folder, commit, refs):
    """Lay `folder` out as the hub's download cache holds `repo_id` at `commit`, reachable by the names `refs`: what
    an offline machine sees after a download, so that loading by hub name runs without a network."""
    import shutil

    root = os.path.join(cache_dir, "models--" + repo_id.replace("/", "--"))
    shutil.copytree(folder, os.path.join(root, "snapshots", commit))
    os.makedirs(os.path.join(root, "refs"), exist_ok=True)
    for ref in refs:
        with open(os.path.join(root, "refs", ref), "w") as handle:
            handle.write(commit)


def test_conversion_reads_the_given_hub_cache_revision_and_token(tmp_path, monkeypatch):
    plain_config = Wav2Vec2Config(**{k: v for k, v in tiny_config().to_dict().items() if k != "model_type"})
    versions = {}
    for seed, ref in ((0, "main"), (1, "v2")):
        torch.manual_seed(seed)
        versions[ref] = Wav2Vec2Model(plain_config)
        versions[ref].save_pretrained(tmp_path / ref)
        publish_in_hub_cache(str(tmp_path / "cache"), "someone/w2v", tmp_path / ref, str(seed) * 40, [ref])
    seen_tokens = []
    original = Wav2Vec2Config.get_config_dict.__func__

    def spy(cls, *args, **kwargs):
        seen_tokens.append(kwargs.get("token"))
        return original(cls, *args, **kwargs)

    monkeypatch.setattr(Wav2Vec2Config, "get_config_dict", classmethod(spy))
    key = "encoder.layers.0.attention.q_proj.weight"
    for ref in ("main", "v2"):
        model = Wav2Vec2ForCTCWithUOT.from_plain_wav2vec2(
            "someone/w2v", cache_dir=str(tmp_path / "cache"), revision=None if ref == "main" else ref,
            token="secret", teacher_hidden_size=TEACHER_WIDTH,
        )
        assert torch.equal(model.wav2vec2.state_dict()[key], versions[ref].state_dict()[key]), ref
    assert not torch.equal(versions["main"].state_dict()[key], versions["v2"].state_dict()[key])
    assert seen_tokens and all(token == "secret" for token in seen_tokens)
    with pytest.raises(OSError):  # without the cache folder there is nothing to load offline
        Wav2Vec2ForCTCWithUOT.from_plain_wav2vec2("someone/w2v", teacher_hidden_size=TEACHER_WIDTH)


def test_plain_export_is_a_stock_wav2vec2_for_ctc_with_the_same_logits(tmp_path):
    torch.manual_seed(11)
    model = Wav2Vec2ForCTCWithUOT(tiny_config(feat_extract_norm="group")).eval()
    model.save_plain_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["model_type"] == "wav2vec2" and saved["architectures"] == ["Wav2Vec2ForCTC"]
    assert "auto_map" not in saved and not any(key in saved for key in ("aligner", "rho_frames", "kt_weight"))
    assert not list(tmp_path.glob("*.py"))
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as weights:
        assert not any(key.startswith("kt_adapter") for key in weights.keys())
    plain = AutoModelForCTC.from_pretrained(tmp_path).eval()
    assert type(plain) is Wav2Vec2ForCTC
    batch = without_teacher(make_batch())
    # Exact on every machine: the stock class runs the same modules on the same weights, kernel for kernel.
    torch.testing.assert_close(plain(**batch).logits, model(**batch).logits, rtol=0, atol=0)
    torch.testing.assert_close(plain(**batch).loss, model(**batch).loss, rtol=0, atol=0)
