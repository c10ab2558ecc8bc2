"""Audio and transcript helpers shared by the training script, the experiments and the corpus builder.

Audio is decoded with soundfile and resampled with soxr, so that neither torchcodec nor FFmpeg is needed (the
`datasets` 5.x `Audio` feature decodes only through torchcodec).
"""

from __future__ import annotations

import io
import re
from typing import Any, Optional

import numpy as np

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
