"""Audio and transcript helpers shared by the training script, the experiments and the corpus builder.

Audio is decoded with soundfile and resampled with soxr, so that neither torchcodec nor FFmpeg is needed (the
`datasets` 5.x `Audio` feature decodes only through torchcodec).
"""

from __future__ import annotations

import io
import math
import re
from typing import Any, Callable, Optional

import numpy as np
import torch

# The rate every wav2vec 2.0 checkpoint expects.
SAMPLING_RATE = 16_000


class InvalidExample(ValueError):
    """An example that cannot be used; the message names the file or row."""


def decode_audio(value: Any, resample: bool = True, where: str = "audio") -> np.ndarray:
    """16 kHz mono float32 samples from a path, an undecoded `{path, bytes}` cell or a decoded `{array, ...}` one.

    Args:
        value: a file path, a `datasets` audio cell left undecoded (`{"path": ..., "bytes": ...}`), or a decoded
            one (`{"array": ..., "sampling_rate": ...}`).
        resample: resample audio at another rate to 16 kHz with soxr; when false such audio is invalid.
        where: how error messages name the example (a row number, a file name).

    Raises:
        InvalidExample: unreadable or empty audio, or another rate when `resample` is false.
    """
    try:
        if isinstance(value, dict) and value.get("array") is not None:
            samples, rate = np.asarray(value["array"], dtype=np.float32), int(value["sampling_rate"])
        else:
            import soundfile

            source = value
            if isinstance(value, dict):
                source = io.BytesIO(value["bytes"]) if value.get("bytes") else value.get("path")
            samples, rate = soundfile.read(source, dtype="float32", always_2d=True)
            samples = samples.mean(axis=1)
    except (RuntimeError, OSError, TypeError, ValueError) as error:  # soundfile's LibsndfileError is a RuntimeError
        raise InvalidExample(f"{where}: cannot read the audio ({error}).") from error
    if samples.size == 0:
        raise InvalidExample(f"{where}: the audio is empty (truncated file?).")
    if rate != SAMPLING_RATE:
        if not resample:
            raise InvalidExample(f"{where}: audio at {rate} Hz, expected {SAMPLING_RATE} Hz (or pass --resample).")
        import soxr

        samples = soxr.resample(samples, rate, SAMPLING_RATE).astype(np.float32)
    return samples


def normalise_text(text: str, chars_to_ignore: Optional[list[str]] = None, lower: bool = True) -> str:
    """Remove the characters of `chars_to_ignore`, lower-case if `lower`, and collapse whitespace."""
    if chars_to_ignore:
        text = re.sub("[" + re.escape("".join(chars_to_ignore)) + "]", "", text)
    if lower:
        text = text.lower()
    return " ".join(text.split())


# ------------------------------------------------------------------------ inputs of the anchor and the oracle


def frame_timing(config) -> tuple[float, float]:
    """`(hop, first_centre)` in seconds for a wav2vec 2.0 config: frame `t` of the convolutional front end is centred
    on `first_centre + t * hop`, the middle of its receptive field."""
    hop, receptive_field = 1, 1
    for kernel, stride in zip(config.conv_kernel, config.conv_stride):
        receptive_field += (kernel - 1) * hop
        hop *= stride
    return hop / SAMPLING_RATE, (receptive_field - 1) / 2 / SAMPLING_RATE


def _spelling(piece: str) -> str:
    """The characters a WordPiece token spells (`"##"` marks a continuation of the word before it)."""
    return piece[2:] if piece.startswith("##") else piece


def piece_word_indices(text: str, pieces: list[str]) -> Optional[list[int]]:
    """The whitespace-word index in `text` of each WordPiece token of `pieces` (`"##"` marks a continuation), or
    `None` when the pieces do not spell `text` in order (an `[UNK]`, a cased or accent-stripping mismatch)."""
    word_of, word, after_space = [], -1, True
    for character in text:
        if character != " " and after_space:
            word += 1
        word_of.append(word)
        after_space = character == " "
    position, result = 0, []
    for piece in pieces:
        while position < len(text) and text[position] == " ":
            position += 1
        spelled = _spelling(piece)
        if not spelled or text[position : position + len(spelled)] != spelled:
            return None
        result.append(word_of[position])
        position += len(spelled)
    return result


def token_characters(
    pieces: list[list[str]], vocab: dict, n_tokens: int, units_of: Optional[Callable[[str], list[int]]] = None
) -> torch.Tensor:
    """`(B, n_tokens, V)` float tensor, 1 where CTC vocabulary id `c` (of `vocab`, unit to id) spells part of
    piece `j` of example `b`: the anchor's input (`Wav2Vec2UOTConfig.alignment_anchor_weight`). Padding rows are 0.

    Args:
        pieces: each transcript's teacher word pieces.
        vocab: the CTC vocabulary.
        n_tokens: the padded number of tokens.
        units_of: the ids spelling one piece; default its characters' ids (characters outside the vocabulary are
            left out). A word-piece vocabulary passes `WordPieceUnits.units_of`, which gives a piece that is
            itself an output unit that unit alone.
    """
    if units_of is None:
        units_of = lambda piece: [vocab[c] for c in _spelling(piece) if c in vocab]  # noqa: E731
    table = torch.zeros(len(pieces), n_tokens, max(vocab.values()) + 1)
    for b, example in enumerate(pieces):
        for j, piece in enumerate(example[:n_tokens]):
            table[b, j, units_of(piece)] = 1.0
    return table


def token_frame_spans(
    texts: list[str], pieces: list[list[str]], words: list, hop: float, first_centre: float, n_tokens: int
) -> torch.Tensor:
    """`(B, n_tokens, 2)` long tensor: `[start, end)` encoder frames of the word of each piece, from word timings.

    Args:
        texts: the normalised transcripts the pieces were made from.
        pieces: each transcript's word pieces (`TeacherOutput.tokens`).
        words: each utterance's `[[word, start_s, end_s], ...]` (the corpus's `words` column, JSON-decoded), or
            `None`.
        hop, first_centre: the frames' timing (`frame_timing`).
        n_tokens: the padded number of tokens.

    A frame belongs to a word when its centre lies in `[start_s, end_s)`. An utterance whose words cannot be lined
    up with its pieces (no timings, a word of punctuation only that normalisation removed, an unknown piece) gets
    empty spans `[0, 0)`: the oracle then gives it no plan and it counts in no padding diagnostic.
    """
    spans = torch.zeros(len(texts), n_tokens, 2, dtype=torch.long)
    for b, (text, example, timing) in enumerate(zip(texts, pieces, words)):
        indices = piece_word_indices(text, example[:n_tokens])
        if timing is None or indices is None or len(text.split()) != len(timing):
            continue
        for j, word in enumerate(indices):
            _, start, end = timing[word]
            spans[b, j, 0] = max(0, math.ceil((start - first_centre) / hop))
            spans[b, j, 1] = max(0, math.ceil((end - first_centre) / hop))
    return spans
