"""The ways out of the degenerate plan (docs/METHOD.md): the acoustic anchor, the cost's scale, the centred teacher,
the contrastive loss, the ramp, the control aligners (diagonal, oracle) and the instruments that tell a degenerate
plan from one that follows the speech. Each is checked against a computation written out independently here."""

import json
import math
import os
import sys

import numpy as np
import pytest
import torch

from modeling_uot_ctc import Wav2Vec2ForCTCWithUOT, Wav2Vec2UOTConfig, solve_uot
from modeling_uot_ctc.costs import character_anchor_cost, cost_spread
from modeling_uot_ctc.data import piece_word_indices, token_characters, token_frame_spans
from modeling_uot_ctc.diagnostics import frames_per_token, token_discrimination
from modeling_uot_ctc.modeling_wav2vec2_uot import alignment_cost, centred_states, transfer_terms
from modeling_uot_ctc.reference_plans import diagonal_plan, oracle_plan, span_plan
from modeling_uot_ctc.solver import ALIGNERS

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


def test_cost_scale_std_measures_eps_in_units_of_the_cost_spread():
    gen = torch.Generator().manual_seed(1)
    frames, tokens = torch.randn(2, 7, 8, generator=gen), torch.randn(2, 3, 8, generator=gen)
    frame_mask = torch.tensor([[1] * 7, [1] * 4 + [0] * 3], dtype=torch.bool)
    token_mask = torch.ones(2, 3, dtype=torch.bool)
    scaled = alignment_cost(frames, tokens, frame_mask, token_mask, cost_scale="std")
    for b, n_frames in enumerate((7, 4)):
        cells = scaled[b, :n_frames].flatten().numpy()
        assert np.std(cells) == pytest.approx(1.0, rel=1e-5)
    assert (scaled[1, 4:] == 0).all()
    flat = torch.zeros(1, 3, 2)
    assert cost_spread(flat, torch.ones(1, 3, dtype=torch.bool), torch.ones(1, 2, dtype=torch.bool)) == 1


def test_anchor_blend_and_centred_teacher():
    gen = torch.Generator().manual_seed(2)
    frames, tokens = torch.randn(1, 6, 8, generator=gen), torch.randn(1, 4, 8, generator=gen)
    masks = torch.ones(1, 6, dtype=torch.bool), torch.tensor([[1, 1, 1, 0]], dtype=torch.bool)
    log_probs = torch.randn(1, 6, 5, generator=gen).log_softmax(-1)
    characters = (torch.rand(1, 4, 5, generator=gen) > 0.5).float()
    cosine = alignment_cost(frames, tokens, *masks)
    anchor = character_anchor_cost(log_probs, characters, *masks)
    blended = alignment_cost(
        frames, tokens, *masks, anchor_weight=0.25, log_probs=log_probs, token_characters=characters
    )
    torch.testing.assert_close(blended, 0.75 * cosine + 0.25 * anchor)
    centred = centred_states(tokens, masks[1])
    torch.testing.assert_close(centred[0, :3].mean(0), torch.zeros(8), atol=1e-6, rtol=0)
    assert (centred[0, 3] == 0).all()
    torch.testing.assert_close(centred[0, :3], tokens[0, :3] - tokens[0, :3].mean(0))


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


def test_contrastive_loss_is_cross_entropy_over_the_batchs_tokens():
    gen = torch.Generator().manual_seed(3)
    frames = torch.randn(2, 6, 8, generator=gen)
    teacher = torch.randn(2, 3, 8, generator=gen)
    frame_mask = torch.ones(2, 6, dtype=torch.bool)
    token_mask = torch.tensor([[1, 1, 1], [1, 1, 0]], dtype=torch.bool)
    spans = torch.tensor([[[0, 2], [2, 4], [4, 6]], [[0, 3], [3, 6], [0, 0]]])
    settings = dict(aligner=oracle_plan_with(spans), solver_settings={})
    loss, plans, _ = transfer_terms(frames, frame_mask, teacher, token_mask, kt_loss_type="infonce",
                                    kt_temperature=0.2, **settings)
    # Written out: pooled frames per token, cosine logits against the 5 valid states of the batch.
    pooled = [frames[0, 0:2].mean(0), frames[0, 2:4].mean(0), frames[0, 4:6].mean(0), frames[1, 0:3].mean(0),
              frames[1, 3:6].mean(0)]
    valid = [teacher[0, 0], teacher[0, 1], teacher[0, 2], teacher[1, 0], teacher[1, 1]]
    unit = lambda v: v / v.norm()  # noqa: E731
    logits = torch.stack([torch.stack([unit(p) @ unit(z) for z in valid]) for p in pooled]) / 0.2
    per_token = torch.nn.functional.cross_entropy(logits, torch.arange(5), reduction="none")
    expected = (per_token[:3].mean() + per_token[3:].mean()) / 2
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    both, _, _ = transfer_terms(frames, frame_mask, teacher, token_mask, kt_loss_type="cosine+infonce",
                                kt_temperature=0.2, **settings)
    cosine, _, _ = transfer_terms(frames, frame_mask, teacher, token_mask, kt_loss_type="cosine", **settings)
    torch.testing.assert_close(both, cosine + expected, rtol=1e-5, atol=1e-6)


def oracle_plan_with(spans):
    return lambda cost, frame_mask, token_mask, **settings: oracle_plan(
        cost, frame_mask, token_mask, token_frame_spans=spans
    )


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


def test_padding_share_leaves_out_utterances_without_timings():
    from modeling_uot_ctc.modeling_wav2vec2_uot import padding_share

    plans = torch.full((2, 4, 2), 1 / 8)
    masks = torch.ones(2, 4, dtype=torch.bool), torch.ones(2, 2, dtype=torch.bool)
    spans = torch.tensor([[[0, 2], [2, 3]], [[0, 0], [0, 0]]])  # the second utterance has no timings
    share = padding_share(plans, *masks, spans)
    assert share[0].item() == pytest.approx(0.25) and math.isnan(share[1].item())
    assert padding_share(plans, *masks, None).isnan().all()
    gen = torch.Generator().manual_seed(6)
    frames, teacher = torch.randn(2, 4, 8, generator=gen), torch.randn(2, 2, 8, generator=gen)
    _, _, stats = transfer_terms(frames, *masks[:1], teacher, masks[1], aligner=diagonal_plan, solver_settings={},
                                 token_frame_spans=spans)
    assert stats[-1].item() == pytest.approx(0.25)  # the mean over the timed utterance only


def test_anchor_refuses_inputs_of_another_batch():
    with pytest.raises(ValueError, match="share B and V"):
        character_anchor_cost(torch.zeros(2, 5, 4), torch.zeros(1, 3, 4))
