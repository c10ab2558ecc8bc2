"""Transcribe audio with a CTC model, greedily or with the n-gram language model stored beside it.

    python -m modeling_uot_ctc.transcribe outputs/demo_uot speech.wav other.flac
    python -m modeling_uot_ctc.transcribe outputs/demo_uot speech.wav --greedy
    python -m modeling_uot_ctc.transcribe your-name/your-model speech.wav    # a Hub repository, fetched whole

Prints one `file<TAB>transcript` line a file. The language model is used when the model's folder has one
(`alphabet.json` and `language_model/`, see `modeling_uot_ctc.language_model`). The functions are the library's way
to decode with an n-gram model: they call pyctcdecode directly, which transformers 5 also does inside the ASR
pipeline (`pipeline(..., decoder=load_decoder(folder))`, deprecated there) and transformers 6 no longer will.
"""

from __future__ import annotations

import argparse
import os
from typing import Optional, Sequence

import numpy as np
import torch

from .data import SAMPLING_RATE, decode_audio
from .language_model import DEFAULT_BEAM_WIDTH, decode, has_language_model, load_decoder


@torch.no_grad()
def log_probs(model, input_values: Sequence[np.ndarray]) -> list[np.ndarray]:
    """Each utterance's `(frames, vocab)` float32 log-probabilities, one utterance at a time (as the ASR pipeline
    runs: a group-norm front end would otherwise see the batch's padding).

    Args:
        model: a CTC model (`Wav2Vec2ForCTC` or `Wav2Vec2ForCTCWithUOT`); it is put in eval mode.
        input_values: each utterance as its feature extractor returns it (normalised 16 kHz samples).
    """
    model.eval()
    device = next(model.parameters()).device
    results = []
    for values in input_values:
        inputs = torch.as_tensor(np.asarray(values, dtype=np.float32), device=device)[None]
        logits = model(inputs).logits[0]
        results.append(torch.log_softmax(logits.float(), dim=-1).cpu().numpy())
    return results


def greedy(tokenizer, log_probs_list: Sequence[np.ndarray]) -> list[str]:
    """Greedy CTC decoding (best label per frame, repeats merged, blanks dropped), as the ASR pipeline decodes."""
    return [tokenizer.decode(np.asarray(item).argmax(-1)) for item in log_probs_list]


def transcribe(
    model,
    processor,
    audio: Sequence[np.ndarray],
    decoder=None,
    beam_width: int = DEFAULT_BEAM_WIDTH,
) -> list[str]:
    """Transcripts of 16 kHz mono `audio` arrays: greedy without `decoder`, else beam search with its language model.

    Args:
        model: a CTC model.
        processor: its `Wav2Vec2Processor` (feature extractor and tokenizer).
        audio: float arrays at 16 kHz (`modeling_uot_ctc.data.decode_audio` reads and resamples files).
        decoder: a `pyctcdecode.BeamSearchDecoderCTC`, e.g. `language_model.load_decoder(model_folder)`.
        beam_width: beams kept by the search.
    """
    features = [processor.feature_extractor(a, sampling_rate=SAMPLING_RATE).input_values[0] for a in audio]
    scores = log_probs(model, features)
    return greedy(processor.tokenizer, scores) if decoder is None else decode(decoder, scores, beam_width)


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="a model folder (or Hub name) with its processor")
    parser.add_argument("files", nargs="+", help="audio files (any rate; resampled to 16 kHz)")
    parser.add_argument("--greedy", action="store_true", help="ignore the folder's language model")
    parser.add_argument("--beam_width", type=int, default=DEFAULT_BEAM_WIDTH, help="beams kept by the search")
    parser.add_argument("--alpha", type=float, help="LM weight (default: the one stored with the model)")
    parser.add_argument("--beta", type=float, help="word bonus (default: the one stored with the model)")
    args = parser.parse_args(argv)
    from transformers import AutoModelForCTC, Wav2Vec2Processor

    from . import Wav2Vec2UOTConfig  # noqa: F401  (registers the UOT model with the auto classes)

    folder = args.model
    if not os.path.isdir(folder):
        # A Hub name: the language model's files are read from disk, so the whole repository is fetched.
        from huggingface_hub import snapshot_download

        folder = snapshot_download(args.model)
    model = AutoModelForCTC.from_pretrained(folder)
    processor = Wav2Vec2Processor.from_pretrained(folder)
    decoder = None
    if not args.greedy and has_language_model(folder):
        decoder = load_decoder(folder, processor.tokenizer, alpha=args.alpha, beta=args.beta)
    audio = [decode_audio(path, where=path) for path in args.files]
    for path, text in zip(args.files, transcribe(model, processor, audio, decoder, args.beam_width)):
        print(f"{path}\t{text}")


if __name__ == "__main__":
    main()
