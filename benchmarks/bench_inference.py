"""Stock ASR pipeline throughput: a saved Wav2Vec2ForCTCWithUOT against the same weights saved as Wav2Vec2ForCTC.

    python benchmarks/bench_inference.py              # demo-size model, CPU
    python benchmarks/bench_inference.py --device 0   # first GPU

Both folders are written on the spot (random weights from the demo config, a character vocabulary); both pipelines
transcribe the same synthetic clips, alternated, several rounds; the median throughput of each and their ratio are
printed, and the transcripts are checked to be identical. Nothing of the transfer runs at inference, so the ratio
should be 1.00 within noise.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import numpy as np
import torch
from transformers import (
    Wav2Vec2Config,
    Wav2Vec2CTCTokenizer,
    Wav2Vec2FeatureExtractor,
    Wav2Vec2ForCTC,
    Wav2Vec2Processor,
    pipeline,
)

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from modeling_uot_ctc import Wav2Vec2ForCTCWithUOT, Wav2Vec2UOTConfig  # noqa: E402
from bench_train_step import SIZES  # noqa: E402


def save_pair(root, size):
    characters = list("abcdefghijklmnopqrstuvwxyz'")
    vocab = {"[PAD]": 0, "[UNK]": 1, "|": 2, **{c: i + 3 for i, c in enumerate(characters)}}
    encoder = dict(SIZES[size]["encoder"], vocab_size=len(vocab), pad_token_id=0)
    torch.manual_seed(0)
    uot = Wav2Vec2ForCTCWithUOT(Wav2Vec2UOTConfig(**encoder, teacher_hidden_size=384)).eval()
    plain = Wav2Vec2ForCTC(Wav2Vec2Config(**encoder)).eval()
    plain.load_state_dict(uot.state_dict(), strict=False)
    folders = {}
    for name, model in (("uot", uot), ("plain", plain)):
        folder = os.path.join(root, name)
        os.makedirs(folder)
        with open(os.path.join(folder, "vocab.json"), "w") as handle:
            json.dump(vocab, handle)
        tokenizer = Wav2Vec2CTCTokenizer(os.path.join(folder, "vocab.json"), unk_token="[UNK]", pad_token="[PAD]",
                                         word_delimiter_token="|", bos_token=None, eos_token=None)
        extractor = Wav2Vec2FeatureExtractor(return_attention_mask=True)
        Wav2Vec2Processor(feature_extractor=extractor, tokenizer=tokenizer).save_pretrained(folder)
        model.save_pretrained(folder)
        folders[name] = folder
    return folders


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=sorted(SIZES), default="demo")
    parser.add_argument("--device", default="-1", help="pipeline device: -1 for the CPU, 0 for the first GPU")
    parser.add_argument("--clips", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    clips = [rng.standard_normal(int(args.seconds * 16_000)).astype(np.float32) for _ in range(args.clips)]
    with tempfile.TemporaryDirectory() as root:
        folders = save_pair(root, args.size)
        device = int(args.device)
        asr = {
            "uot": pipeline("automatic-speech-recognition", model=folders["uot"], trust_remote_code=True, device=device),
            "plain": pipeline("automatic-speech-recognition", model=folders["plain"], device=device),
        }
        assert type(asr["uot"].model).__name__ == "Wav2Vec2ForCTCWithUOT"
        texts = {name: [out["text"] for out in p(clips, batch_size=args.batch_size)] for name, p in asr.items()}
        assert texts["uot"] == texts["plain"], "the two models transcribe differently"
        times = {name: [] for name in asr}
        for _ in range(args.rounds):
            for name, p in asr.items():
                start = time.perf_counter()
                p(clips, batch_size=args.batch_size)
                times[name].append(time.perf_counter() - start)
    audio_seconds = args.clips * args.seconds
    speed = {name: audio_seconds / statistics.median(t) for name, t in times.items()}
    where = "CPU" if device < 0 else torch.cuda.get_device_name(device)
    print(f"size {args.size}, {args.clips} clips of {args.seconds} s, batch {args.batch_size}, {where}, "
          f"median of {args.rounds} rounds; transcripts identical")
    for name in asr:
        print(f"{name:>6}: {speed[name]:8.1f} s of audio per second")
    print(f"ratio uot / plain throughput: {speed['uot'] / speed['plain']:.3f}")


if __name__ == "__main__":
    main()
