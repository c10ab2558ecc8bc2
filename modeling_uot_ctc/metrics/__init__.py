"""Local `evaluate` modules for WER and CER: `evaluate.load(WER_PATH)` works offline and gives jiwer's numbers."""

import os

_HERE = os.path.dirname(os.path.abspath(__file__))
WER_PATH = os.path.join(_HERE, "wer")
CER_PATH = os.path.join(_HERE, "cer")
METRIC_PATHS = {"wer": WER_PATH, "cer": CER_PATH}
