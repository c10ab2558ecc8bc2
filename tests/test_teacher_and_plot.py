import numpy as np
import pytest
import torch
from PIL import Image
from transformers import BertConfig, BertModel, BertTokenizerFast

from modeling_uot_ctc.plotting import plot_alignment
from modeling_uot_ctc.teacher import TextTeacher, default_teacher_path

SENTENCES = ["the air is clean", "i can breathe better when the air is clean", "unbelievably quiet"]


@pytest.fixture(scope="module")
def tiny_teacher(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny_bert")
    words = sorted({w for s in SENTENCES for w in s.split()} - {"unbelievably"})
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words, "un", "##believ", "##ably", "quiet"]
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tokenizer = BertTokenizerFast(vocab=str(folder / "vocab.txt"), do_lower_case=True)
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(vocab), hidden_size=24, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=32, hidden_dropout_prob=0.3, attention_probs_dropout_prob=0.3)
    return TextTeacher(model=BertModel(config), tokenizer=tokenizer, layer=-1)


def check_teacher(teacher):
    out = teacher(SENTENCES)
    for k, sentence in enumerate(SENTENCES):
        pieces = teacher.tokenizer.tokenize(sentence)
        assert out.tokens[k] == pieces  # one state per word piece, no [CLS] / [SEP]
        assert int(out.attention_mask[k].sum()) == len(pieces)
        assert (out.hidden_states[k, len(pieces):] == 0).all()
    assert out.hidden_states.shape[-1] == teacher.hidden_size
    assert not out.hidden_states.requires_grad
    # Identical whatever the company a sentence keeps in its batch.
    for k, sentence in enumerate(SENTENCES):
        alone = teacher([sentence])
        n = len(out.tokens[k])
        torch.testing.assert_close(alone.hidden_states[0, :n], out.hidden_states[k, :n], rtol=0, atol=1e-5)
    reordered = teacher(SENTENCES[::-1])
    torch.testing.assert_close(reordered.hidden_states[2, : len(out.tokens[0])],
                               out.hidden_states[0, : len(out.tokens[0])], rtol=0, atol=1e-5)


def test_tiny_teacher_gives_one_state_per_word_piece(tiny_teacher):
    assert tiny_teacher.tokenizer.tokenize("unbelievably") == ["un", "##believ", "##ably"]
    check_teacher(tiny_teacher)


def test_teacher_is_frozen_and_stays_in_eval_mode(tiny_teacher):
    tiny_teacher.train()
    assert not tiny_teacher.encoder.training
    assert all(not p.requires_grad for p in tiny_teacher.parameters())
    with torch.enable_grad():
        assert not tiny_teacher(SENTENCES[:1]).hidden_states.requires_grad


def test_teacher_layer_choice(tiny_teacher):
    embeddings = TextTeacher(model=tiny_teacher.encoder, tokenizer=tiny_teacher.tokenizer, layer=0)(SENTENCES)
    last = tiny_teacher(SENTENCES)
    assert not torch.allclose(embeddings.hidden_states, last.hidden_states)


def test_offline_minilm_teacher():
    teacher = TextTeacher(default_teacher_path())
    assert teacher.hidden_size == 384
    check_teacher(teacher)


def test_plan_picture_is_a_png_of_the_plan(tmp_path):
    rng = np.random.default_rng(0)
    plan = torch.from_numpy(rng.random((57, 6)))
    tokens = ["the", "air", "is", "clean", "##ly", "!"]
    figure = plot_alignment(plan, tmp_path / "plan.png", tokens=tokens, frame_rate=50, title="example")
    with open(tmp_path / "plan.png", "rb") as handle:
        assert handle.read(8) == b"\x89PNG\r\n\x1a\n"
    image = Image.open(tmp_path / "plan.png")
    image.verify()
    shown = figure.axes[0].images[0].get_array()
    assert shown.shape == (6, 57)  # one cell per plan entry, tokens on the vertical axis
    np.testing.assert_allclose(np.asarray(shown).sum(1), np.ones(6), rtol=1e-6)
    assert [t.get_text() for t in figure.axes[0].get_yticklabels()] == tokens
    assert Image.open(tmp_path / "plan.png").size == tuple(int(round(s * 100)) for s in figure.get_size_inches())
    with pytest.raises(ValueError):
        plot_alignment(plan, tmp_path / "bad.png", tokens=tokens[:3])


def test_plan_picture_marks_the_word_timings(tmp_path):
    plan = torch.from_numpy(np.random.default_rng(1).random((100, 3)))
    words = [("clean", 0.1, 0.6), ("air", 0.6, 1.2), ("now", 1.3, 1.9)]
    figure = plot_alignment(plan, tmp_path / "plan.png", tokens=["clean", "air", "now"], frame_rate=50,
                            word_timings=words)
    axes = figure.axes[0]
    boundaries = sorted({line.get_xdata()[0] for line in axes.get_lines()})
    assert boundaries == [0.1, 0.6, 1.2, 1.3, 1.9]
    (top,) = axes.child_axes
    assert [t.get_text() for t in top.get_xticklabels()] == ["clean", "air", "now"]
    np.testing.assert_allclose(top.get_xticks(), [0.35, 0.9, 1.6])
    with pytest.raises(ValueError, match="frame_rate"):
        plot_alignment(plan, tmp_path / "bad.png", word_timings=words)


def test_teacher_reads_the_given_hub_cache_revision_and_token(tmp_path, monkeypatch):
    import modeling_uot_ctc.teacher as teacher_module
    from script_fixtures import write_teacher
    from test_modeling import publish_in_hub_cache

    for seed, ref in ((0, "main"), (1, "v2")):
        write_teacher(str(tmp_path / ref), seed=seed)
        publish_in_hub_cache(str(tmp_path / "cache"), "someone/teacher", tmp_path / ref, str(seed) * 40, [ref])
    seen = []
    for name in ("AutoModel", "AutoTokenizer"):
        loader = getattr(teacher_module, name)

        class Spy:
            @staticmethod
            def from_pretrained(*args, _loader=loader, **kwargs):
                seen.append((kwargs.get("token"), kwargs.get("trust_remote_code")))
                return _loader.from_pretrained(*args, **kwargs)

        monkeypatch.setattr(teacher_module, name, Spy)
    for ref in ("main", "v2"):
        from_hub = TextTeacher(
            "someone/teacher", cache_dir=tmp_path / "cache", revision=None if ref == "main" else ref, token="secret",
            trust_remote_code=True,
        )
        local = TextTeacher(model=BertModel.from_pretrained(tmp_path / ref),
                            tokenizer=BertTokenizerFast.from_pretrained(tmp_path / ref))
        torch.testing.assert_close(from_hub(SENTENCES[:1]).hidden_states, local(SENTENCES[:1]).hidden_states)
        assert from_hub.fingerprint == local.fingerprint
    assert TextTeacher("someone/teacher", cache_dir=tmp_path / "cache", revision="v2").fingerprint != \
        TextTeacher("someone/teacher", cache_dir=tmp_path / "cache").fingerprint
    assert seen and all(item == ("secret", True) for item in seen[:4])


def test_teacher_fingerprint_follows_what_the_states_depend_on(tiny_teacher):
    before = tiny_teacher.fingerprint
    tiny_teacher(SENTENCES)  # a call leaves truncation and padding state in the tokenizer's backend
    assert tiny_teacher.fingerprint == before
    twin = TextTeacher(model=tiny_teacher.encoder, tokenizer=tiny_teacher.tokenizer, layer=-1)
    assert twin.fingerprint == before
    twin.layer = 1
    assert twin.fingerprint != before
    twin.layer, twin.max_length = -1, 8
    assert twin.fingerprint != before
    twin.max_length = tiny_teacher.max_length
    assert twin.fingerprint == before
    other = TextTeacher(model=BertModel(tiny_teacher.encoder.config), tokenizer=tiny_teacher.tokenizer, layer=-1)
    assert other.fingerprint != before  # other weights
