"""N-gram language models for decoding a CTC model's output: estimated with KenLM from text, stored beside the model
in the layout of the Hub's wav2vec 2.0 checkpoints, and applied by pyctcdecode's beam search.

    python -m modeling_uot_ctc.language_model --model_dir outputs/demo_ctc --text sentences.txt --order 3

The layout is what `Wav2Vec2ProcessorWithLM.save_pretrained` writes and `BeamSearchDecoderCTC.load_from_dir` reads:
`<model_dir>/alphabet.json` (the decoder's labels, in the CTC tokenizer's id order) and `<model_dir>/language_model/`
(`attrs.json`: the LM weight `alpha`, the word bonus `beta` and the unknown-word offset; the KenLM model; and
`unigrams.txt`, the words it was estimated on). The model's own processor is left a plain `Wav2Vec2Processor`, so
that loading the checkpoint never needs pyctcdecode; :func:`load_decoder` reads the language model when it is
wanted (transformers 5 also takes it as the ASR pipeline's `decoder`, a path that transformers 6 removes).

Why these libraries (docs/PERFORMANCE.md has the measurements): KenLM's `lmplz` is the estimator the Hub's n-gram
checkpoints are made with (modified Kneser-Ney); pyctcdecode decodes with an open vocabulary (a word the text never
had costs `unk_score_offset` instead of being impossible), which flashlight-text's lexicon decoder cannot, and it
reads and writes the layout above. Its last release (0.5.0) pins numpy<2 without needing it: install it with
`--no-deps` (the Makefile does).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from typing import Iterable, Optional, Sequence

import numpy as np

# The files of the layout, as pyctcdecode names them.
ALPHABET_FILE = "alphabet.json"
LANGUAGE_MODEL_DIR = "language_model"
DEFAULT_ALPHA = 0.5
DEFAULT_BETA = 1.0
DEFAULT_BEAM_WIDTH = 32


def find_kenlm_tool(name: str) -> str:
    """The path of KenLM's `lmplz` or `build_binary`: beside this Python (a virtual environment's `bin/`, where
    `scripts/install_kenlm.sh` puts them), else on `PATH`."""
    beside = os.path.join(os.path.dirname(sys.executable), name)
    path = beside if os.access(beside, os.X_OK) else shutil.which(name)
    if path is None:
        raise FileNotFoundError(
            f"KenLM's `{name}` was not found beside {sys.executable} or on PATH. Build it with "
            "`bash scripts/install_kenlm.sh .venv/bin` (make install does), or put KenLM's bin/ folder on PATH."
        )
    return path


def decoder_labels(tokenizer) -> list[str]:
    """The decoder's alphabet: the CTC tokenizer's vocabulary in id order (pyctcdecode reads the padding token as
    the blank and the word delimiter `|` as the space between words, as `Wav2Vec2ProcessorWithLM` relies on)."""
    vocabulary = tokenizer.get_vocab()
    return [token for token, _ in sorted(vocabulary.items(), key=lambda item: item[1])]


def estimate_ngram(sentences: Iterable[str], path: str, order: int = 3, memory: str = "10%") -> str:
    """Estimate a modified Kneser-Ney n-gram model of `order` from `sentences` with KenLM's `lmplz`, and write it in
    KenLM's binary format to `path` (which it returns).

    Args:
        sentences: one sentence a line, spelled as the recogniser spells (normalised like its training labels).
        path: the binary model to write.
        order: the n-gram order (KenLM's default build takes up to 6).
        memory: `lmplz`'s memory budget (`-S`), a share of the machine's memory or a size such as `"500M"`.

    Small corpora lack the counts that the discounts are estimated from; `--discount_fallback` then uses KenLM's
    fixed ones instead of failing.
    """
    if order < 1:
        raise ValueError(f"The n-gram order must be at least 1, got {order}.")
    lines = [" ".join(sentence.split()) for sentence in sentences]
    lines = [line for line in lines if line]
    if not lines:
        raise ValueError("No text to estimate a language model from: every sentence is empty.")
    with tempfile.TemporaryDirectory() as work:
        text_path, arpa_path = os.path.join(work, "text.txt"), os.path.join(work, "model.arpa")
        with open(text_path, "w", encoding="utf-8") as handle:
            handle.write("\n".join(lines) + "\n")
        _run([find_kenlm_tool("lmplz"), "-o", str(order), "-S", memory, "-T", work, "--discount_fallback",
              "--text", text_path, "--arpa", arpa_path])
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        _run([find_kenlm_tool("build_binary"), arpa_path, path])
    return path


def build_language_model(
    sentences: Iterable[str],
    model_dir: str,
    tokenizer,
    order: int = 3,
    alpha: float = DEFAULT_ALPHA,
    beta: float = DEFAULT_BETA,
    memory: str = "10%",
):
    """Estimate an n-gram model from `sentences`, write it with the decoder's alphabet into `model_dir` (the layout
    above), and return the decoder (a `pyctcdecode.BeamSearchDecoderCTC`).

    Args:
        sentences: the text, one sentence an item, normalised as the labels were; never evaluation sentences.
            Sentences with a character outside the tokenizer's vocabulary are left out (the recogniser could not
            spell them).
        model_dir: the model's folder; `alphabet.json` and `language_model/` are written there (replacing any).
        tokenizer: the model's CTC tokenizer (its vocabulary is the alphabet).
        order: the n-gram order.
        alpha, beta: the LM weight and the word-insertion bonus stored with it (choose them on a validation split:
            :func:`choose_weights`).
        memory: `lmplz`'s memory budget.
    """
    build_ctcdecoder = _pyctcdecode().build_ctcdecoder
    labels = decoder_labels(tokenizer)
    delimiter = getattr(tokenizer, "word_delimiter_token", "|")
    spelled = {token for token in labels if len(token) == 1 and token != delimiter}
    kept = [s for s in (" ".join(s.split()) for s in sentences) if s and set(s.replace(" ", "")) <= spelled]
    if not kept:
        raise ValueError("No sentence is spelled with the tokenizer's characters: normalise the text as the labels.")
    with tempfile.TemporaryDirectory() as work:
        binary = estimate_ngram(kept, os.path.join(work, f"{order}gram.bin"), order=order, memory=memory)
        unigrams = sorted({word for sentence in kept for word in sentence.split()})
        decoder = build_ctcdecoder(labels, kenlm_model_path=binary, unigrams=unigrams, alpha=alpha, beta=beta)
        language_model_dir = os.path.join(model_dir, LANGUAGE_MODEL_DIR)
        if os.path.isdir(language_model_dir):
            shutil.rmtree(language_model_dir)
        os.makedirs(model_dir, exist_ok=True)
        decoder.save_to_dir(model_dir)
    # Read back from the folder: the decoder in memory points at the temporary copy of the model.
    return load_decoder(model_dir, tokenizer)


def text_without(sentences: Iterable[str], held_out: Iterable[str], chars_to_ignore: Sequence[str]) -> list[str]:
    """A language model's text: `sentences` normalised as transcripts are (lower case, `chars_to_ignore` removed),
    less every one of `held_out` (raw transcripts, e.g. the test and validation sentences) and empty lines.

    Args:
        sentences: the text, one sentence an item.
        held_out: sentences the model must not have seen.
        chars_to_ignore: characters removed before the comparison, as the training script removes them.
    """
    from .data import normalise_text

    normalise = lambda text: normalise_text(text, chars_to_ignore, True)  # noqa: E731
    excluded = {normalise(text) for text in held_out}
    return [line for line in map(normalise, sentences) if line and line not in excluded]


def has_language_model(model_dir: str) -> bool:
    """Whether `model_dir` holds a language model in the layout above."""
    return os.path.isfile(os.path.join(model_dir, ALPHABET_FILE)) and os.path.isdir(
        os.path.join(model_dir, LANGUAGE_MODEL_DIR)
    )


def load_decoder(model_dir: str, tokenizer=None, alpha: Optional[float] = None, beta: Optional[float] = None):
    """The beam-search decoder stored in `model_dir` (a `pyctcdecode.BeamSearchDecoderCTC`).

    Args:
        model_dir: a model folder with `alphabet.json` and `language_model/`.
        tokenizer: when given, its vocabulary must be the decoder's alphabet (else the LM would score other
            characters than the model emits).
        alpha, beta: replace the stored LM weight and word bonus.
    """
    missing = [name for name in (ALPHABET_FILE, LANGUAGE_MODEL_DIR)
               if not os.path.exists(os.path.join(model_dir, name))]
    if missing:
        raise FileNotFoundError(
            f"{model_dir} holds no language model (missing {', '.join(missing)}): build one with "
            "`python -m modeling_uot_ctc.language_model --model_dir ... --text ...` or the script's --lm_text."
        )
    language_model_dir = os.path.join(model_dir, LANGUAGE_MODEL_DIR)
    if not any(name.endswith((".bin", ".arpa")) for name in os.listdir(language_model_dir)):
        raise FileNotFoundError(f"{language_model_dir} holds no KenLM model (.bin or .arpa).")
    decoder = _pyctcdecode().BeamSearchDecoderCTC.load_from_dir(model_dir)
    if tokenizer is not None:
        with open(os.path.join(model_dir, ALPHABET_FILE), encoding="utf-8") as handle:
            stored = json.load(handle)["labels"]
        expected = _pyctcdecode().Alphabet.build_alphabet(decoder_labels(tokenizer)).labels
        if stored != expected:
            raise ValueError(
                f"The language model in {model_dir} was built for another vocabulary: its alphabet has "
                f"{len(stored)} labels, the tokenizer {len(expected)}; they differ at "
                f"{[(i, a, b) for i, (a, b) in enumerate(zip(stored, expected)) if a != b][:5] or 'the end'}. "
                "Rebuild it with this model's tokenizer."
            )
    if alpha is not None or beta is not None:
        decoder.reset_params(alpha=None if alpha is None else float(alpha), beta=None if beta is None else float(beta))
    return decoder


def store_weights(model_dir: str, alpha: float, beta: float) -> None:
    """Store the LM weight and the word bonus in `model_dir`'s `language_model/attrs.json`, where
    `BeamSearchDecoderCTC.load_from_dir` (and so :func:`load_decoder`) reads them."""
    path = os.path.join(model_dir, LANGUAGE_MODEL_DIR, "attrs.json")
    with open(path, encoding="utf-8") as handle:
        attrs = json.load(handle)
    attrs.update(alpha=float(alpha), beta=float(beta))
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(attrs, handle)


def decode(decoder, log_probs: Sequence[np.ndarray], beam_width: int = DEFAULT_BEAM_WIDTH) -> list[str]:
    """Beam search with the language model over each utterance's `(frames, vocab)` log-probabilities (its own
    frames only: cut the batch padding away first)."""
    return [decoder.decode(np.asarray(item, dtype=np.float32), beam_width=beam_width) for item in log_probs]


def choose_weights(
    decoder,
    log_probs: Sequence[np.ndarray],
    references: Sequence[str],
    alphas: Sequence[float] = (0.0, 0.25, 0.5, 1.0, 1.5),
    betas: Sequence[float] = (0.0, 0.5, 1.0, 2.0),
    beam_width: int = DEFAULT_BEAM_WIDTH,
) -> dict:
    """Choose the LM weight `alpha` and the word bonus `beta` by word error rate on a validation set (never the
    test set), set them on `decoder`, and return `{"alpha", "beta", "wer", "grid"}` (`grid`: every pair's WER)."""
    import jiwer

    grid = {}
    for alpha in alphas:
        for beta in betas:
            decoder.reset_params(alpha=float(alpha), beta=float(beta))  # pyctcdecode takes floats only
            grid[(alpha, beta)] = jiwer.wer(list(references), decode(decoder, log_probs, beam_width))
    (alpha, beta), wer = min(grid.items(), key=lambda item: (item[1], item[0]))
    decoder.reset_params(alpha=float(alpha), beta=float(beta))
    return {"alpha": alpha, "beta": beta, "wer": wer, "grid": grid}


def _run(command: list[str]) -> None:
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{os.path.basename(command[0])} failed ({done.returncode}):\n{done.stderr[-3000:]}")


def _pyctcdecode():
    try:
        import kenlm  # noqa: F401  (pyctcdecode decodes without a language model when it is missing)
        import pyctcdecode
    except ImportError as error:
        raise ImportError(
            f"N-gram decoding needs pyctcdecode and kenlm ({error}): `pip install kenlm pygtrie` and "
            "`pip install --no-deps pyctcdecode==0.5.0` (its numpy<2 pin is not needed), or `make install`."
        ) from error
    return pyctcdecode


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_dir", required=True, help="the model's folder (its tokenizer sets the alphabet)")
    parser.add_argument("--text", required=True, help="text file, one sentence a line, never evaluation sentences")
    parser.add_argument("--order", type=int, default=3, help="n-gram order")
    parser.add_argument("--alpha", type=float, default=DEFAULT_ALPHA, help="LM weight stored with the model")
    parser.add_argument("--beta", type=float, default=DEFAULT_BETA, help="word-insertion bonus stored with it")
    parser.add_argument("--chars_to_ignore", nargs="*", help="characters removed from the text, as in training")
    parser.add_argument("--keep_case", action="store_true", help="do not lower-case the text")
    args = parser.parse_args(argv)
    from transformers import AutoTokenizer

    from .data import normalise_text

    tokenizer = AutoTokenizer.from_pretrained(args.model_dir)
    with open(args.text, encoding="utf-8") as handle:
        sentences = [normalise_text(line, args.chars_to_ignore, not args.keep_case) for line in handle]
    build_language_model(sentences, args.model_dir, tokenizer, args.order, args.alpha, args.beta)
    print(f"wrote a {args.order}-gram language model to {os.path.join(args.model_dir, LANGUAGE_MODEL_DIR)}")


if __name__ == "__main__":
    main()
