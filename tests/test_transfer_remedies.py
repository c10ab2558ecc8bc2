"""The ways out of the degenerate plan (docs/METHOD.md) as the model and the script use them: the acoustic anchor, the
ramp, the control aligners (diagonal, oracle), their settings and inputs, and the instruments that tell a degenerate
plan from one that follows the speech. Each is checked against a computation written out independently here; the
transfer's own functions (cost scale, centred teacher, contrastive loss, padding share) are in test_transfer.py."""

import json
import math
import os
import sys

import numpy as np
import pytest
import torch

from modeling_uot_ctc import Wav2Vec2ForCTCWithUOT, Wav2Vec2UOTConfig, solve_uot
from modeling_uot_ctc.costs import character_anchor_cost
from modeling_uot_ctc.data import piece_word_indices, token_characters, token_frame_spans
from modeling_uot_ctc.diagnostics import frames_per_token, token_discrimination
from modeling_uot_ctc.reference_plans import diagonal_plan, oracle_plan, span_plan
from modeling_uot_ctc.solver import ALIGNERS
from modeling_uot_ctc.transfer import alignment_cost

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "experiments"))
import run_experiments as experiments  # noqa: E402

TINY = dict(
    hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32, conv_dim=(8, 8),
    conv_stride=(5, 4), conv_kernel=(10, 4), num_conv_pos_embeddings=8, num_conv_pos_embedding_groups=2,
    vocab_size=6, teacher_hidden_size=8, do_stable_layer_norm=True,
)


def test_anchor_cost_is_one_minus_the_best_character_posterior():
    gen = torch.Generator().manual_seed(0)
    log_probs = torch.randn(2, 5, 4, generator=gen).log_softmax(-1)
    characters = torch.zeros(2, 3, 4)
    characters[0, 0, [1, 2]] = 1
    characters[0, 1, 3] = 1  # token 2 of example 0 has no character: it costs 1 everywhere
    characters[1, :, 0] = 1
    frame_mask = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    token_mask = torch.tensor([[1, 1, 1], [1, 1, 0]], dtype=torch.bool)
    cost = character_anchor_cost(log_probs, characters, frame_mask, token_mask)
    probs = log_probs.exp().numpy()
    for b in range(2):
        for i in range(5):
            for j in range(3):
                ids = [c for c in range(4) if characters[b, j, c]]
                expected = 1 - max((probs[b, i, c] for c in ids), default=0.0)
                if not (frame_mask[b, i] and token_mask[b, j]):
                    expected = 0.0
                assert cost[b, i, j].item() == pytest.approx(expected, abs=1e-6)


def test_diagonal_plan_matches_the_evaluations_diagonal():
    frame_mask = torch.tensor([[1] * 11, [1] * 7 + [0] * 4, [1] * 3 + [0] * 8], dtype=torch.bool)
    token_mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 1, 1, 1]], dtype=torch.bool)
    plan = diagonal_plan(torch.zeros(3, 11, 4), frame_mask, token_mask).plan
    torch.testing.assert_close(plan, experiments.diagonal_plans(frame_mask, token_mask))
    assert ALIGNERS["diagonal"] is diagonal_plan


def test_span_plan_spreads_each_token_over_its_word():
    frame_mask = torch.tensor([[1] * 8 + [0] * 2], dtype=torch.bool)
    token_mask = torch.tensor([[1, 1, 1]], dtype=torch.bool)
    spans = torch.tensor([[[1, 4], [1, 4], [6, 10]]])  # two pieces of one word; the last span runs into padding
    plan = span_plan(spans, frame_mask, token_mask)
    expected = torch.zeros(1, 10, 3)
    expected[0, 1:4, 0] = expected[0, 1:4, 1] = 1 / 3 / 3
    expected[0, 6:8, 2] = 1 / 2 / 3
    torch.testing.assert_close(plan, expected)
    result = oracle_plan(torch.zeros(1, 10, 3), frame_mask, token_mask, token_frame_spans=spans)
    torch.testing.assert_close(result.plan, expected)


def test_word_pieces_find_their_words_and_frames():
    assert piece_word_indices("i can't breathe", ["i", "can", "'", "t", "breath", "##e"]) == [0, 1, 1, 1, 2, 2]
    assert piece_word_indices("a  b", ["a", "b"]) == [0, 1]
    assert piece_word_indices("a b", ["a", "[UNK]"]) is None
    words = [["Breathe", 0.10, 0.50], ["now.", 0.50, 0.90]]
    hop, first_centre = 0.02, 0.01
    spans = token_frame_spans(["breathe now"], [["breath", "##e", "now"]], [words], hop, first_centre, 4)
    # Frame t is centred on 0.01 + 0.02 t: inside [0.1, 0.5) for t = 5 .. 24, inside [0.5, 0.9) for t = 25 .. 44.
    assert spans[0].tolist() == [[5, 25], [5, 25], [25, 45], [0, 0]]
    untimed = token_frame_spans(["breathe now"], [["breath", "##e", "now"]], [None], hop, first_centre, 3)
    assert (untimed == 0).all()
    table = token_characters([["breath", "##e"]], {"<pad>": 0, "a": 1, "b": 2, "e": 3, "h": 4, "r": 5, "t": 6}, 3)
    assert table[0, 0].tolist() == [0, 1, 1, 1, 1, 1, 1] and table[0, 1].tolist() == [0, 0, 0, 1, 0, 0, 0]
    assert (table[0, 2] == 0).all()


def test_instruments_tell_a_rank_one_plan_from_a_discriminating_one():
    states = torch.eye(4)[None] * 3  # four orthogonal token states
    token_mask = torch.ones(1, 4, dtype=torch.bool)
    same = torch.ones(1, 4, 4)  # every token pooled the same frames
    assert token_discrimination(same, states, token_mask).item() == pytest.approx(1 / 4)
    assert token_discrimination(states + 0.1, states, token_mask).item() == 1.0
    uniform, diagonal = torch.full((1, 8, 4), 1 / 32), diagonal_plan(torch.zeros(1, 8, 4)).plan
    assert frames_per_token(uniform, token_mask).item() == pytest.approx(8.0)
    assert frames_per_token(diagonal, token_mask).item() == pytest.approx(2.0)


def test_ramp_after_the_warmup():
    model = Wav2Vec2ForCTCWithUOT(Wav2Vec2UOTConfig(**TINY, kt_warmup_steps=2, kt_ramp_steps=4))
    assert [model.transfer_scale(step) for step in range(8)] == [0, 0, 0.25, 0.5, 0.75, 1, 1, 1]
    assert model.transfer_scale(None) == 1.0
    flat = Wav2Vec2ForCTCWithUOT(Wav2Vec2UOTConfig(**TINY, kt_warmup_steps=1))
    assert [flat.transfer_scale(step) for step in range(3)] == [0, 1, 1]


@pytest.mark.parametrize("field, value", [
    ("alignment_anchor_weight", 1.5), ("alignment_cost_scale", "mean"), ("teacher_centering", "corpus"),
    ("kt_temperature", 0.0), ("kt_ramp_steps", -1), ("kt_loss_type", "mse"),
])
def test_bad_settings_are_refused(field, value):
    with pytest.raises(ValueError, match=field):
        Wav2Vec2UOTConfig(**TINY, **{field: value})


def batch(n_tokens=3):
    gen = torch.Generator().manual_seed(5)
    audio = torch.randn(2, 1600, generator=gen)
    labels = torch.tensor([[3, 4, 5], [4, 5, -100]])
    teacher = torch.randn(2, n_tokens, 8, generator=gen)
    return audio, labels, teacher


def test_the_anchor_and_the_oracle_ask_for_their_inputs():
    audio, labels, teacher = batch()
    anchored = Wav2Vec2ForCTCWithUOT(Wav2Vec2UOTConfig(**TINY, alignment_anchor_weight=0.5)).train()
    with pytest.raises(ValueError, match="teacher_token_characters"):
        anchored(audio, labels=labels, teacher_hidden_states=teacher)
    oracle = Wav2Vec2ForCTCWithUOT(Wav2Vec2UOTConfig(**TINY, aligner="oracle")).train()
    with pytest.raises(ValueError, match="token_frame_spans"):
        oracle(audio, labels=labels, teacher_hidden_states=teacher)


def test_forward_with_anchor_oracle_and_instruments():
    """The model's plan and diagnostics equal those computed from its pieces: its posteriors in the anchor, the
    solver on the blended cost, the padding share from the word spans."""
    torch.manual_seed(0)
    audio, labels, teacher = batch()
    characters = torch.zeros(2, 3, 6)
    characters[:, 0, 3], characters[:, 1, 4], characters[:, 2, 5] = 1, 1, 1
    spans = torch.tensor([[[1, 3], [3, 5], [5, 7]], [[2, 4], [4, 6], [6, 8]]])
    config = Wav2Vec2UOTConfig(**TINY, alignment_anchor_weight=0.7, alignment_eps=0.05, rho_frames=0.1,
                               temporal_order_weight=1.0, hidden_dropout=0.0, final_dropout=0.0,
                               attention_dropout=0.0, activation_dropout=0.0, feat_proj_dropout=0.0)
    model = Wav2Vec2ForCTCWithUOT(config).eval()
    out = model(audio, labels=labels, teacher_hidden_states=teacher, teacher_token_characters=characters,
                token_frame_spans=spans, output_alignments=True)
    frames = model.kt_adapter(model.wav2vec2(audio).last_hidden_state)
    n_frames = frames.shape[1]
    masks = torch.ones(2, n_frames, dtype=torch.bool), torch.ones(2, 3, dtype=torch.bool)
    cost = 0.3 * alignment_cost(frames, teacher, *masks) + 0.7 * character_anchor_cost(
        out.logits.log_softmax(-1), characters, *masks
    )
    plan = solve_uot(cost, *masks, **config.solver_settings).plan
    torch.testing.assert_close(out.alignments, plan, rtol=1e-5, atol=1e-7)
    inside = torch.zeros(2, n_frames, dtype=torch.bool)
    inside[0, 1:7], inside[1, 2:8] = True, True
    padding = [(plan[b][~inside[b]].sum() / plan[b].sum()).item() for b in range(2)]
    assert out.padding_mass.item() == pytest.approx(np.mean(padding), rel=1e-5)
    assert 0 <= out.token_discrimination.item() <= 1 and out.frames_per_token.item() >= 1
    assert out.cost_spread_over_eps.item() > 0

    settings = {**config.to_dict(), "aligner": "oracle", "alignment_anchor_weight": 0.0}
    oracle = Wav2Vec2ForCTCWithUOT(Wav2Vec2UOTConfig(**settings)).eval()
    oracle.load_state_dict(model.state_dict())
    out = oracle(audio, labels=labels, teacher_hidden_states=teacher, token_frame_spans=spans, output_alignments=True)
    torch.testing.assert_close(out.alignments, span_plan(spans, *masks))
    assert out.padding_mass.item() == 0.0


def test_the_script_trains_the_oracle_from_word_timings(tmp_path, teacher):
    """A `words` column reaches the model as token spans: the oracle trains, and the padding share is logged."""
    from script_fixtures import base_arguments, write_corpus

    import run_speech_recognition_uot as script

    corpus = write_corpus(str(tmp_path / "timed"), word_timings=True)
    arguments = base_arguments(corpus, teacher, str(tmp_path / "out"), max_steps=2, aligner="oracle",
                               alignment_anchor_weight=0.5, do_eval=False)
    script.main(arguments)
    with open(tmp_path / "out" / "trainer_state.json") as handle:
        logged = [h for h in json.load(handle)["log_history"] if "kt_loss" in h]
    assert len(logged) == 2
    for entry in logged:
        # The oracle pools only inside words; speech_like's words fill the audio but the pauses between them.
        assert 0.0 <= entry["padding_mass"] < 0.2 and not math.isnan(entry["token_discrimination"])
        assert entry["kt_loss"] > 0


def test_anchor_refuses_inputs_of_another_batch():
    with pytest.raises(ValueError, match="share B and V"):
        character_anchor_cost(torch.zeros(2, 5, 4), torch.zeros(1, 3, 4))
