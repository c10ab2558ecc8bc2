"""Wav2Vec2ForCTCWithUOT: a wav2vec 2.0 CTC model that learns, in training, from a language model's token states.

At inference the model is `Wav2Vec2ForCTC`: same weights, same logits, same speed; the adapter is the only extra
module and it is not used without teacher states.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from typing import Optional, Union

import torch
from torch import nn
from transformers import PreTrainedModel, Wav2Vec2Config, Wav2Vec2ForCTC, Wav2Vec2Model
from transformers.utils import ModelOutput, logging

from .configuration_wav2vec2_uot import Wav2Vec2UOTConfig
from .cuda_graphs import TransferGraphs
from .reference_plans import oracle_plan
from .solver import ALIGNERS
from .transfer import TRANSFER_STATS, anchor_inputs, padding_share, transfer_terms

logger = logging.get_logger(__name__)

# Checkpoints whose weights `from_plain_wav2vec2` can take: HuBERT, WavLM, data2vec and wav2vec2-conformer share
# wav2vec 2.0's config fields, but not its weight names or modules, and would load as a random encoder.
_CONVERTIBLE_MODEL_TYPES = ("wav2vec2", Wav2Vec2UOTConfig.model_type)


@dataclass
class Wav2Vec2UOTOutput(ModelOutput):
    """Output of [`Wav2Vec2ForCTCWithUOT`].

    Args:
        loss (`torch.FloatTensor` of shape `()`, *optional*, returned when `labels` are given):
            `ctc_loss + kt_weight * kt_loss` (just `ctc_loss` when the transfer did not run).
        logits (`torch.FloatTensor` of shape `(batch_size, frames, vocab_size)`):
            CTC logits, exactly those of `Wav2Vec2ForCTC` with the same weights.
        ctc_loss (`torch.FloatTensor` of shape `()`, *optional*):
            The CTC loss, reduced as `config.ctc_loss_reduction` says.
        kt_loss (`torch.FloatTensor` of shape `()`, *optional*, returned when the transfer ran):
            The transfer loss: for each example the mean over its valid tokens of `1 - cos(xhat_j, z_j)` (plus its
            transport cost `<C, P>` for `kt_loss_type="cosine+transport"`), then the mean over examples. Each
            example thus weighs the same whatever its length or the batch's padding.
        alignments (`torch.FloatTensor` of shape `(batch_size, frames, tokens)`, *optional*):
            The transport plans, when `output_alignments=True` and the transfer ran; zero on padding.
        token_coverage, dropped_frame_fraction, transported_mass (`torch.FloatTensor` of shape `()`, *optional*):
            Batch means of the detection diagnostics of the plans (see `modeling_uot_ctc.diagnostics`), detached.
            (The mean normalised frame mass is not repeated: with uniform frame weights it is the transported
            mass.)
        alignment_converged (`torch.FloatTensor` of shape `()`, *optional*):
            The fraction of the batch's examples whose solver met `config.alignment_tol`: below 1, the iteration
            budget (`alignment_max_iter`, or `alignment_graph_iterations` with CUDA graphs) is too small.
        token_discrimination (`torch.FloatTensor` of shape `()`, *optional*):
            Batch mean of the share of tokens whose pooled frames are closer to their own teacher state than to any
            other of the utterance (`modeling_uot_ctc.diagnostics.token_discrimination`); about `1 / N` when the
            plan is rank one (every token pools the same frames).
        cost_spread_over_eps (`torch.FloatTensor` of shape `()`, *optional*):
            Batch mean of how unequally the frames fit the transcript under the solved cost, in units of `eps`
            (`modeling_uot_ctc.diagnostics.frame_fit_spread`); near or below 1, no frame can drop out.
        frames_per_token (`torch.FloatTensor` of shape `()`, *optional*):
            Batch mean of the effective number of frames each token pools.
        padding_mass (`torch.FloatTensor` of shape `()`, *optional*):
            Batch mean of the share of the plan's mass on valid frames inside no token's span, when
            `token_frame_spans` are given (NaN otherwise): the mass on silence and noise.
        hidden_states, attentions:
            As in `Wav2Vec2ForCTC`, when asked for.
    """

    # The parent's fields first, in its order, so that tuple outputs start as Wav2Vec2ForCTC's do.
    loss: Optional[torch.FloatTensor] = None
    logits: Optional[torch.FloatTensor] = None
    hidden_states: Optional[tuple[torch.FloatTensor, ...]] = None
    attentions: Optional[tuple[torch.FloatTensor, ...]] = None
    ctc_loss: Optional[torch.FloatTensor] = None
    kt_loss: Optional[torch.FloatTensor] = None
    alignments: Optional[torch.FloatTensor] = None
    token_coverage: Optional[torch.FloatTensor] = None
    dropped_frame_fraction: Optional[torch.FloatTensor] = None
    transported_mass: Optional[torch.FloatTensor] = None
    alignment_converged: Optional[torch.FloatTensor] = None
    token_discrimination: Optional[torch.FloatTensor] = None
    cost_spread_over_eps: Optional[torch.FloatTensor] = None
    frames_per_token: Optional[torch.FloatTensor] = None
    padding_mass: Optional[torch.FloatTensor] = None


class Wav2Vec2UOTModel(Wav2Vec2Model):
    """The bare encoder of [`Wav2Vec2ForCTCWithUOT`]: what `AutoModel` loads from its checkpoints (a `Wav2Vec2Model`
    with the UOT configuration, whose transfer fields it ignores)."""

    config_class = Wav2Vec2UOTConfig


class Wav2Vec2ForCTCWithUOT(Wav2Vec2ForCTC):
    """`Wav2Vec2ForCTC` with an adapter and a transfer loss that align its frames with a teacher's token states.

    The adapter maps encoder states (layer `config.kt_encoder_layer`) to the teacher's width; the aligner of
    `config.aligner` computes a transport plan between the adapted frames and the teacher's tokens on the cosine
    cost; each token's acoustic counterpart is the plan-weighted mean of the frames, pulled towards the token's state.
    """

    config_class = Wav2Vec2UOTConfig

    def __init__(self, config: Wav2Vec2UOTConfig, target_lang: Optional[str] = None):
        super().__init__(config, target_lang=target_lang)
        acoustic_size = config.output_hidden_size if config.add_adapter else config.hidden_size
        if config.kt_adapter == "linear":
            self.kt_adapter = nn.Linear(acoustic_size, config.teacher_hidden_size)
        else:
            inner = config.kt_adapter_hidden_size or config.teacher_hidden_size
            self.kt_adapter = nn.Sequential(
                nn.Linear(acoustic_size, inner), nn.GELU(), nn.Linear(inner, config.teacher_hidden_size)
            )
        # Built at the first graphed step (`config.kt_cuda_graphs`); holds device state, not weights.
        self._transfer_graphs: Optional[TransferGraphs] = None
        self.post_init()

    @classmethod
    def from_plain_wav2vec2(
        cls,
        pretrained: Union[str, os.PathLike, Wav2Vec2ForCTC, nn.Module],
        *,
        revision: Optional[str] = None,
        cache_dir: Optional[Union[str, os.PathLike]] = None,
        token: Optional[Union[str, bool]] = None,
        **config_overrides,
    ) -> "Wav2Vec2ForCTCWithUOT":
        """Build a UOT model from a plain wav2vec 2.0 checkpoint, keeping every encoder weight.

        Args:
            pretrained: a saved `Wav2Vec2ForCTC`, `Wav2Vec2ForPreTraining` or `Wav2Vec2Model` (folder or hub name,
                e.g. `"facebook/wav2vec2-base"`), or such a model in memory. Other encoders (HuBERT, WavLM,
                data2vec, wav2vec2-conformer) are refused: their weights do not fit this model.
            revision: the branch, tag or commit of a hub checkpoint.
            cache_dir: where hub downloads are stored (default: the hub's own cache).
            token: a hub token for private or gated checkpoints (default: the stored login).
            config_overrides: fields of [`Wav2Vec2UOTConfig`] (and of `Wav2Vec2Config`, such as `vocab_size`,
                `pad_token_id` or `ctc_loss_reduction` for a new CTC head), e.g. `teacher_hidden_size=768`.

        The adapter is freshly initialised; so is the CTC head when the checkpoint has none (a `Wav2Vec2Model`) or
        when `vocab_size` changes it.
        """
        if isinstance(pretrained, nn.Module):
            model_type = getattr(getattr(pretrained, "config", None), "model_type", type(pretrained).__name__)
            if not isinstance(pretrained, PreTrainedModel) or model_type not in _CONVERTIBLE_MODEL_TYPES:
                raise ValueError(_not_convertible(type(pretrained).__name__, model_type))
            base_config = pretrained.config.to_dict()
            state_dict = pretrained.state_dict()
        else:
            hub = dict(revision=revision, cache_dir=cache_dir, token=token)
            base_config, _ = Wav2Vec2Config.get_config_dict(pretrained, **hub)
            if base_config.get("model_type") not in _CONVERTIBLE_MODEL_TYPES:
                raise ValueError(_not_convertible(str(pretrained), base_config.get("model_type")))
            state_dict = None
        for key in ("model_type", "architectures", "auto_map", "transformers_version"):
            base_config.pop(key, None)
        config = Wav2Vec2UOTConfig(**{**base_config, **config_overrides})
        if state_dict is None:
            # A new vocabulary re-sizes the CTC head; the encoder's shapes come from the checkpoint's own config.
            return cls.from_pretrained(pretrained, config=config, ignore_mismatched_sizes=True, **hub)
        model = cls(config)
        if not any(key.startswith("wav2vec2.") for key in state_dict):
            state_dict = {f"wav2vec2.{key}": value for key, value in state_dict.items()}
        own = model.state_dict()
        compatible = {k: v for k, v in state_dict.items() if k in own and own[k].shape == v.shape}
        model.load_state_dict(compatible, strict=False)
        return model

    def to_plain_wav2vec2(self) -> Wav2Vec2ForCTC:
        """A stock `Wav2Vec2ForCTC` with a copy of this model's weights (all but the adapter): at inference the same
        model."""
        with torch.device("meta"):  # no random initialisation of weights that are replaced at once
            plain = Wav2Vec2ForCTC(self.config.to_plain_config())
        own = {key: value.clone() for key, value in self.state_dict().items() if not key.startswith("kt_adapter.")}
        plain.load_state_dict(own, strict=True, assign=True)
        return plain.train(self.training)

    def save_pretrained(self, save_directory: Union[str, os.PathLike], *args, **kwargs):
        # The saved code serves the bare encoder too: `AutoModel` with `trust_remote_code=True` finds it in
        # `auto_map`, as `AutoModelForCTC` finds this class (the library adds only the class being saved).
        encoder = f"{Wav2Vec2UOTModel.__module__.rsplit('.', 1)[-1]}.{Wav2Vec2UOTModel.__name__}"
        self.config.auto_map = {**(getattr(self.config, "auto_map", None) or {}), "AutoModel": encoder}
        return super().save_pretrained(save_directory, *args, **kwargs)

    def save_plain_pretrained(self, save_directory: Union[str, os.PathLike], **kwargs) -> None:
        """Save this model as a stock `Wav2Vec2ForCTC` checkpoint (`model_type` "wav2vec2", no adapter, no code).

        `pipeline("automatic-speech-recognition")`, the Hub's widget and other toolkits load it with nothing but
        transformers, without `trust_remote_code`. Keyword arguments go to `save_pretrained` (e.g.
        `push_to_hub=True, repo_id="you/model"`); save the processor beside it, as for any checkpoint.
        """
        self.to_plain_wav2vec2().save_pretrained(save_directory, **kwargs)

    def forward(
        self,
        input_values: Optional[torch.Tensor],
        attention_mask: Optional[torch.Tensor] = None,
        labels: Optional[torch.Tensor] = None,
        teacher_hidden_states: Optional[torch.Tensor] = None,
        teacher_attention_mask: Optional[torch.Tensor] = None,
        input_lengths: Optional[torch.Tensor] = None,
        teacher_token_characters: Optional[torch.Tensor] = None,
        token_frame_spans: Optional[torch.Tensor] = None,
        transfer_scale: Optional[float] = None,
        output_alignments: bool = False,
        output_attentions: Optional[bool] = None,
        output_hidden_states: Optional[bool] = None,
        return_dict: Optional[bool] = None,
        **kwargs,
    ) -> Union[tuple, Wav2Vec2UOTOutput]:
        r"""
        Args:
            input_values (`torch.FloatTensor` of shape `(batch_size, samples)`):
                Raw 16 kHz audio, normalised as the feature extractor does.
            attention_mask (`torch.LongTensor` of shape `(batch_size, samples)`, *optional*):
                1 on real samples, 0 on padding. Needed for padded batches of layer-norm models; with
                `feat_extract_norm="group"` (wav2vec2-base) the convolutional front end still sees the padding, as
                in `Wav2Vec2ForCTC`.
            labels (`torch.LongTensor` of shape `(batch_size, label_length)`, *optional*):
                CTC targets: vocabulary ids, `-100` on padding. The blank is `config.pad_token_id`. Ids must be
                below `config.vocab_size`.
            teacher_hidden_states (`torch.FloatTensor` of shape `(batch_size, tokens, teacher_hidden_size)`,
            *optional*):
                The teacher's states of each transcript's word pieces, special tokens removed (what
                `modeling_uot_ctc.teacher.TextTeacher` returns). Without them, the model is `Wav2Vec2ForCTC`.
            teacher_attention_mask (`torch.LongTensor` of shape `(batch_size, tokens)`, *optional*):
                1 on valid teacher tokens. Default: all valid.
            input_lengths (`torch.LongTensor` of shape `(batch_size,)`, *optional*):
                The number of real samples in each row of `input_values`, for batches padded without an attention
                mask: the feature extractors of wav2vec2-base and its group-norm relatives return none, because
                their encoders were pretrained on unmasked input. The encoder still sees the zero padding, as in
                `Wav2Vec2ForCTC`; the CTC loss and the transfer use these lengths, so that padding is never taken
                for speech. Ignored when `attention_mask` is given.
            teacher_token_characters (`torch.Tensor` of shape `(batch_size, tokens, vocab_size)`, *optional*):
                1 where a CTC vocabulary id spells part of a teacher token (`modeling_uot_ctc.data.token_characters`
                builds it). Needed when `config.alignment_anchor_weight > 0`.
            token_frame_spans (`torch.LongTensor` of shape `(batch_size, tokens, 2)`, *optional*):
                `[start, end)` encoder frames of each teacher token's word, from the corpus's word timings
                (`modeling_uot_ctc.data.token_frame_spans`). Needed by the `"oracle"` aligner; with any aligner they
                give the `padding_mass` diagnostic.
            transfer_scale (`float`, *optional*, defaults to 1):
                A factor on the transfer loss for this step, for schedules: `self.transfer_scale(step)` gives the
                warm-up of `config.kt_warmup_steps` and the ramp of `config.kt_ramp_steps`. At 0 the transfer does
                not run (plain CTC).
            output_alignments (`bool`, *optional*, defaults to `False`):
                Return the transport plans in `alignments`.
        """
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        # Read from the config here: transformers 5 takes an explicit None as "off" rather than "the config's".
        if output_attentions is None:
            output_attentions = self.config.output_attentions
        if output_hidden_states is None:
            output_hidden_states = self.config.output_hidden_states
        if labels is not None and labels.max() >= self.config.vocab_size:
            raise ValueError(
                f"Label ids must be below vocab_size={self.config.vocab_size}, got {int(labels.max())}: the labels "
                "and the model's vocabulary disagree (rebuild the tokenizer or set `vocab_size=len(tokenizer)`)."
            )
        transfer_scale = 1.0 if transfer_scale is None else float(transfer_scale)
        run_transfer = transfer_scale > 0 and self._transfer_enabled(teacher_hidden_states)
        tap_layer = self.config.kt_encoder_layer
        need_hidden = bool(output_hidden_states) or (run_transfer and tap_layer != -1)

        outputs = self.wav2vec2(
            input_values,
            attention_mask=attention_mask,
            output_attentions=output_attentions,
            output_hidden_states=need_hidden,
            return_dict=True,
            **kwargs,
        )
        hidden_states = outputs.last_hidden_state
        logits = self.lm_head(self.dropout(hidden_states))
        # Where each utterance ends, for the losses: the encoder's mask, else one built from the true lengths.
        sample_mask = attention_mask
        if sample_mask is None and input_lengths is not None:
            sample_mask = self._mask_from_lengths(input_lengths, input_values)

        # The CTC loss makes the host wait for all queued device work (it packs its targets and copies its lengths
        # to the device). The eager transfer is queued before it, so that the solver's many small kernels are
        # launched while the GPU still runs the encoder; the graphed transfer, a few launches but milliseconds of
        # device work, is queued after it, so that the GPU runs it while the host launches the backward pass.
        kt_loss = plans = diagnostics = transfer_inputs = None
        if run_transfer:
            acoustic = hidden_states if tap_layer == -1 else outputs.hidden_states[tap_layer]
            frame_mask = self._frame_mask(acoustic.shape[1], sample_mask)
            transfer_inputs = (acoustic, frame_mask, teacher_hidden_states, teacher_attention_mask)
            extras = self._transfer_extras(logits, teacher_token_characters, token_frame_spans)
        transfer_first = run_transfer and not self._transfer_graphs_apply(hidden_states)
        if transfer_first:
            kt_loss, plans, diagnostics = self._transfer_loss(*transfer_inputs, extras)
        ctc_loss = None
        if labels is not None:
            ctc_loss = self._ctc_loss(logits, labels, input_values, sample_mask)
        if run_transfer and not transfer_first:
            kt_loss, plans, diagnostics = self._transfer_loss(*transfer_inputs, extras)

        loss = None
        if ctc_loss is not None:
            loss = ctc_loss if kt_loss is None else ctc_loss + transfer_scale * self.config.kt_weight * kt_loss
        output = Wav2Vec2UOTOutput(
            loss=loss,
            logits=logits,
            ctc_loss=ctc_loss,
            kt_loss=kt_loss,
            alignments=plans if output_alignments else None,
            **(diagnostics or {}),
            hidden_states=outputs.hidden_states if output_hidden_states else None,
            attentions=outputs.attentions if output_attentions else None,
        )
        return output if return_dict else output.to_tuple()

    def _transfer_enabled(self, teacher_hidden_states) -> bool:
        config = self.config
        if teacher_hidden_states is None or config.aligner == "none" or config.kt_weight == 0:
            return False
        if config.aligner not in ALIGNERS and config.aligner != "oracle":
            raise ValueError(
                f"Unknown aligner {config.aligner!r}: choose one of {sorted(ALIGNERS) + ['oracle', 'none']} or "
                "register yours with modeling_uot_ctc.solver.register_aligner."
            )
        if teacher_hidden_states.shape[-1] != config.teacher_hidden_size:
            raise ValueError(
                f"Teacher states have width {teacher_hidden_states.shape[-1]} but config.teacher_hidden_size is "
                f"{config.teacher_hidden_size}: build the model with the teacher's hidden size."
            )
        if self.training and config.kt_encoder_layer != -1 and config.layerdrop > 0:
            raise ValueError(
                f"kt_encoder_layer={config.kt_encoder_layer} needs layerdrop=0 in training: a dropped layer leaves no "
                "hidden state, so the tapped layer would shift from step to step. Set layerdrop=0 or tap the last "
                "layer (kt_encoder_layer=-1)."
            )
        return True

    def transfer_scale(self, step: Optional[int]) -> float:
        """The `transfer_scale` of `forward` at optimiser step `step` (counted from 0): 0 during the warm-up of
        `config.kt_warmup_steps`, then `k / kt_ramp_steps` at the `k`-th step after it (`k` from 1) until it reaches
        1; 1 when `step` is None."""
        if step is None:
            return 1.0
        after_warmup = step - self.config.kt_warmup_steps
        if after_warmup < 0:
            return 0.0
        ramp = self.config.kt_ramp_steps
        return 1.0 if ramp == 0 else min(1.0, (after_warmup + 1) / ramp)

    def _transfer_extras(self, logits, teacher_token_characters, token_frame_spans) -> dict:
        """The inputs of the transfer beyond frames and teacher states, checked against the config."""
        config = self.config
        extras = {}
        if config.alignment_anchor_weight > 0:
            if teacher_token_characters is None:
                raise ValueError(
                    "config.alignment_anchor_weight > 0 needs `teacher_token_characters` in forward (the CTC "
                    "vocabulary ids that spell each teacher token; modeling_uot_ctc.data.token_characters)."
                )
            extras.update(anchor_inputs(logits, teacher_token_characters, config.alignment_anchor_gradient))
        if config.aligner == "oracle" and token_frame_spans is None:
            raise ValueError(
                "The 'oracle' aligner needs `token_frame_spans` in forward (each token's word span in frames, from "
                "word timings; modeling_uot_ctc.data.token_frame_spans)."
            )
        if token_frame_spans is not None:
            extras["token_frame_spans"] = token_frame_spans.to(logits.device)
        return extras

    def _ctc_loss(self, logits, labels, input_values, attention_mask):
        # Wav2Vec2ForCTC's own formula, written out: transformers releases route the parent's loss differently
        # (5.24 resolves it from the class name, 5.17 does not), and this model must match the parent on all.
        attention_mask = (
            attention_mask if attention_mask is not None else torch.ones_like(input_values, dtype=torch.long)
        )
        input_lengths = self._get_feat_extract_output_lengths(attention_mask.sum(-1)).to(torch.long)
        labels_mask = labels >= 0
        target_lengths = labels_mask.sum(-1)
        flattened_targets = labels.masked_select(labels_mask)
        log_probs = nn.functional.log_softmax(logits, dim=-1, dtype=torch.float32).transpose(0, 1)
        with torch.backends.cudnn.flags(enabled=False):
            return nn.functional.ctc_loss(
                log_probs,
                flattened_targets,
                input_lengths,
                target_lengths,
                blank=self.config.pad_token_id,
                reduction=self.config.ctc_loss_reduction,
                zero_infinity=self.config.ctc_zero_infinity,
            )

    @staticmethod
    def _mask_from_lengths(input_lengths: torch.Tensor, input_values: torch.Tensor) -> torch.Tensor:
        batch, n_samples = input_values.shape
        if input_lengths.shape != (batch,) or input_lengths.is_floating_point():
            raise ValueError(
                f"`input_lengths` must hold one integer per example, shape ({batch},), got shape "
                f"{tuple(input_lengths.shape)} of {input_lengths.dtype}."
            )
        # Checked on the CPU only: on a GPU, reading the values back would make the host wait for the encoder.
        on_cpu = input_lengths.device.type == "cpu"
        if on_cpu and not bool(((input_lengths >= 1) & (input_lengths <= n_samples)).all()):
            raise ValueError(
                f"`input_lengths` counts audio samples, from 1 to the padded length {n_samples}; got "
                f"{input_lengths.tolist()}."
            )
        positions = torch.arange(n_samples, device=input_values.device)
        return (positions[None, :] < input_lengths.to(input_values.device)[:, None]).long()

    def _frame_mask(self, n_frames: int, attention_mask: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        if attention_mask is None:
            return None
        return self._get_feature_vector_attention_mask(n_frames, attention_mask).bool()

    def _transfer_graphs_apply(self, hidden_states: torch.Tensor) -> bool:
        """Whether the transfer runs from captured CUDA graphs (`config.kt_cuda_graphs`) in this forward pass: not
        when it reads more than frames and teacher states (the anchor's posteriors, the oracle's spans), which then
        runs eagerly."""
        return (
            self.config.kt_cuda_graphs and self.training and hidden_states.is_cuda and torch.is_grad_enabled()
            and self.config.alignment_anchor_weight == 0 and self.config.aligner != "oracle"
            # nn.DataParallel's replicas share this module's attributes across threads and devices.
            and not getattr(self, "_is_replica", False)
        )

    def _transfer_loss(self, acoustic, frame_mask, teacher_states, teacher_mask, extras: Optional[dict] = None):
        """Align adapted frames with teacher tokens and return `(kt_loss, plans, diagnostics)`."""
        batch, n_frames = acoustic.shape[:2]
        if frame_mask is None:
            frame_mask = torch.ones(batch, n_frames, dtype=torch.bool, device=acoustic.device)
        token_mask = (
            torch.ones(teacher_states.shape[:2], dtype=torch.bool, device=acoustic.device)
            if teacher_mask is None
            else teacher_mask.to(acoustic.device).bool()
        )
        frames = self.kt_adapter(acoustic)
        teacher_states = teacher_states.to(frames.device)
        config = self.config
        extras = dict(extras or {})
        spans = extras.pop("token_frame_spans", None)
        aligner = (
            functools.partial(oracle_plan, token_frame_spans=spans) if config.aligner == "oracle"
            else ALIGNERS[config.aligner]
        )
        settings = dict(
            kt_loss_type=config.kt_loss_type, kt_temperature=config.kt_temperature,
            teacher_centering=config.teacher_centering, anchor_weight=config.alignment_anchor_weight,
            cost_scale=config.alignment_cost_scale,
        )
        graphed = None
        if self._transfer_graphs_apply(frames) and frames.requires_grad:
            terms = functools.partial(
                transfer_terms, aligner=aligner, **settings,
                solver_settings={**config.solver_settings, "max_iter": config.alignment_graph_iterations},
            )
            if self._transfer_graphs is None or self._transfer_graphs.terms.keywords != terms.keywords:
                self._transfer_graphs = TransferGraphs(terms)  # new settings: the old graphs no longer apply
            graphed = self._transfer_graphs(frames, frame_mask, teacher_states, token_mask)
        if graphed is not None:
            kt_loss, plans, stats = graphed
        else:
            kt_loss, plans, stats = transfer_terms(
                frames, frame_mask, teacher_states, token_mask, aligner=aligner,
                solver_settings=config.solver_settings, token_frame_spans=spans, **settings, **extras,
            )
        diagnostics = dict(zip(TRANSFER_STATS, stats.unbind()))
        if graphed is not None and spans is not None:
            # The graphs take frames and teacher states only: the padding diagnostic comes from their plans.
            share = padding_share(plans, frame_mask, token_mask, spans)
            diagnostics["padding_mass"] = torch.where(share.isnan(), 0.0, share).sum() / (~share.isnan()).sum()
        return kt_loss, plans, diagnostics


def _not_convertible(source: str, model_type) -> str:
    return (
        f"{source} is a {model_type!r} model; from_plain_wav2vec2 takes wav2vec 2.0 checkpoints only (model_type "
        f"'wav2vec2': Wav2Vec2ForCTC, Wav2Vec2ForPreTraining or Wav2Vec2Model). HuBERT, WavLM, data2vec and "
        "wav2vec2-conformer encoders have other modules and weight names, so none of their weights would load."
    )


# Saving writes `auto_map` and copies this file and its relative imports next to the weights, so that a folder or
# a Hub repo loads with `trust_remote_code=True` where this package is not installed.
Wav2Vec2UOTConfig.register_for_auto_class()
Wav2Vec2UOTModel.register_for_auto_class("AutoModel")
Wav2Vec2ForCTCWithUOT.register_for_auto_class("AutoModelForCTC")
