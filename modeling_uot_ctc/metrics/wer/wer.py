"""Word error rate as an `evaluate` module that loads from this folder, offline, on jiwer's own computation.

`evaluate.load("wer")` fetches its module from the Hub, and that module calls a jiwer API that jiwer 4 removed;
this one is loaded by path (it is deliberately self-contained, like its twin: `evaluate` copies a module's file
on its own, so the two cannot share code): `evaluate.load(modeling_uot_ctc.metrics.WER_PATH)`.
"""

import datasets
import evaluate
import jiwer

_DESCRIPTION = "Corpus-level word error rate, (substitutions + deletions + insertions) / reference words."
_KWARGS_DESCRIPTION = """
Args:
    predictions (`list[str]`): hypotheses, one per utterance; an empty string is a valid hypothesis.
    references (`list[str]`): reference transcripts, one per utterance, each with at least one word.
Returns:
    `float`: the error rate over the whole corpus (not the mean of per-utterance rates).
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class WER(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": datasets.Value("string"), "references": datasets.Value("string")}
            ),
        )

    def _compute(self, predictions, references):
        return jiwer.process_words(list(references), list(predictions)).wer
