"""Configuration of :class:`~modeling_uot_ctc.modeling_wav2vec2_uot.Wav2Vec2ForCTCWithUOT`."""

from __future__ import annotations

import inspect
import math
from typing import Optional

from transformers import Wav2Vec2Config

from .solver import rho_from_fraction

ALIGNER_CHOICES = ("uot", "ot", "diagonal", "oracle", "none")
KT_LOSS_CHOICES = ("cosine", "cosine+transport", "infonce", "cosine+infonce")
COST_SCALE_CHOICES = ("none", "std")
TEACHER_CENTERING_CHOICES = ("none", "utterance")
ADAPTER_CHOICES = ("linear", "mlp")
GRAD_MODE_CHOICES = ("detach", "unrolled")


class Wav2Vec2UOTConfig(Wav2Vec2Config):
    r"""
    Configuration of a wav2vec 2.0 CTC model trained with unbalanced-optimal-transport knowledge transfer from a
    pretrained language model (the teacher). Every field of [`Wav2Vec2Config`] keeps its meaning; the fields below
    configure the transfer, which runs only in training and only when teacher states are passed to `forward`.

    Args:
        aligner (`str`, *optional*, defaults to `"uot"`):
            How frames are aligned with teacher tokens: `"uot"` (tokens hard, frames relaxed by `rho_frames`),
            `"ot"` (balanced: every frame and token matched in full), `"none"` (no transfer: plain CTC), or the name
            of an aligner added with `modeling_uot_ctc.solver.register_aligner`. Two controls: `"diagonal"` (the
            valid frames cut into equal consecutive runs, one per token, whatever the cost) and `"oracle"` (each
            token pooled from the frames of its word, from word timings passed to `forward` as
            `token_frame_spans`; an upper bound on what an alignment can give the transfer).
        alignment_eps (`float`, *optional*, defaults to 0.1):
            Entropic regularisation of the alignment, in the unit of the cost (cosine distance, in `[0, 2]`).
        rho_frames (`float`, *optional*, defaults to 1.0):
            Weight of the KL penalty on the frame-side marginal: the degree of matching. Small values let silent or
            noisy frames drop out; `inf` (or `None`) makes every frame carry exactly its share. Ignored by `"ot"`.
        rho_tokens (`float`, *optional*, defaults to `None`):
            Weight of the KL penalty on the token-side marginal; `None` (stored for `inf`, which JSON cannot hold)
            makes every token grounded with its full mass, as the method prescribes.
        matching_fraction (`float`, *optional*):
            Alternative way to give `rho_frames`, as the exponent `rho / (rho + eps)` in `(0, 1]` that some papers
            quote. Converted at construction; only `rho_frames` is stored.
        temporal_order_weight (`float`, *optional*, defaults to 0.0):
            Weight of the temporal-order prior (transport far from the diagonal in normalised time costs more);
            0 switches it off. Works with every aligner.
        alignment_anchor_weight (`float`, *optional*, defaults to 0.0):
            Share of the acoustic anchor in the alignment cost: `C = (1 - w) * cosine + w * anchor`, where the anchor
            is `1 - max_c p_i(c)` over the characters `c` of each word piece, from the CTC head's own posteriors
            (`modeling_uot_ctc.costs.character_anchor_cost`). It needs `teacher_token_characters` in `forward`. 0
            is the cosine cost alone; 1 aligns by what the recogniser hears, and the transfer loss still pulls the
            pooled frames towards the teacher. Ours, not the paper's: the cosine cost of an adapter trained with
            the plan is self-fulfilling (docs/RESULTS.md). Measured there, fine-tuning a trained recogniser on
            padded speech of unheard accents: 1 (with `alignment_eps` 0.05, `rho_frames` 0.1 and
            `temporal_order_weight` 1) gives plans of word precision 0.65 with 1 % of the mass on the padding,
            against 0.14 and 39 % for the cosine cost. The default stays 0 because the anchor needs a trained CTC
            head: from scratch, or from a checkpoint without one (`facebook/wav2vec2-base`), its posteriors say
            nothing until CTC has trained for a while (`kt_warmup_steps`).
        alignment_anchor_gradient (`bool`, *optional*, defaults to `False`):
            Let the transfer's gradient reach the CTC head through the anchor (only with
            `alignment_grad_mode="unrolled"` or `kt_loss_type="cosine+transport"`, the terms that differentiate
            the cost). `False` treats the posteriors as constants.
        alignment_cost_scale (`str`, *optional*, defaults to `"none"`):
            `"std"` divides each example's cost by its standard deviation over the valid cells before solving, so
            that `alignment_eps` is measured in units of the cost's spread rather than of the cosine distance (a
            cosine cost spreads over about 0.05, an anchor over about 0.3). `"none"` solves the cost as it is.
            With tokens hard, only the scale matters: a constant shift of the cost changes no plan. The solver adds
            the temporal prior after the scaling, so `temporal_order_weight` is then in units of the spread too.
        teacher_centering (`str`, *optional*, defaults to `"none"`):
            `"utterance"` subtracts from each teacher state the mean state of its utterance before the cost and
            the loss: the direction all states share (cosine about 0.2 with each MiniLM state) then no longer
            rewards pulling every frame the same way. Ours, not the paper's. Measured (docs/RESULTS.md, with
            `alignment_cost_scale="std"` and the temporal prior): token discrimination rises from 0.18 to 0.53 but
            plan precision stays at 0.17 and CER does not move, so the default is `"none"`.
        alignment_max_iter (`int`, *optional*, defaults to 200):
            Largest number of Sinkhorn iterations per batch.
        alignment_tol (`float`, *optional*, defaults to 1e-4):
            Stopping tolerance of the solver: the mass one iteration moves, beyond float rounding (`solve_uot`'s
            `tol`). Changes below the rounding floor (about 5e-6 in float32) do not count, so the same batches
            converge on every machine. The log domain (`alignment_grad_mode="unrolled"`) converges on every machine
            at 1e-5 and above in float32; keep it there.
        alignment_grad_mode (`str`, *optional*, defaults to `"detach"`):
            `"detach"`: the plan is a constant in the transfer loss (cheap, stable). `"unrolled"`: gradients also
            flow through the solver's iterations.
        kt_weight (`float`, *optional*, defaults to 0.5):
            Weight `lambda_kt` of the transfer loss: `loss = ctc_loss + kt_weight * kt_loss`. 0 is plain CTC.
        kt_loss_type (`str`, *optional*, defaults to `"cosine"`):
            `"cosine"`: mean over tokens of `1 - cos(xhat_j, z_j)`, with `xhat_j` the plan-weighted mean of the
            adapted frames. `"cosine+transport"`: adds the transport cost `<C, P>` of each example. `"infonce"`: a
            contrastive loss, cross-entropy of `cos(xhat_j, z_k) / kt_temperature` over every valid token `k` of
            the batch (its own utterance's and the others'), the target being `j`; it rewards pooled frames that
            tell tokens apart, which a rank-one plan cannot. `"cosine+infonce"`: the sum of the two. The
            contrastive terms are ours, not the paper's. Measured (docs/RESULTS.md): with anchored plans it raises
            token discrimination from 0.38 to 0.58 and changes neither the plans nor CER; the default stays
            `"cosine"`.
        kt_temperature (`float`, *optional*, defaults to 0.1):
            Temperature of the contrastive loss.
        kt_warmup_steps (`int`, *optional*, defaults to 0):
            Optimiser steps of CTC alone before the transfer loss starts. A schedule for whoever runs the training
            loop: `model.transfer_scale(step)` turns it into the `transfer_scale` argument of `forward` (the training
            script's Trainer passes it at every step); the model keeps no step of its own. The adapter gets no
            gradient meanwhile: under DDP, wrap the model with `find_unused_parameters=True` (the training script
            does).
        kt_ramp_steps (`int`, *optional*, defaults to 0):
            After the warm-up, the transfer's weight grows linearly from `1 / kt_ramp_steps` of `kt_weight` to all
            of it over this many steps (`model.transfer_scale(step)`); 0 starts it at full weight. Measured
            (docs/RESULTS.md): a warm-up of 50 and a ramp of 100 steps change neither the plans nor CER.
        kt_adapter (`str`, *optional*, defaults to `"linear"`):
            The adapter from acoustic states to the teacher's width: `"linear"` or `"mlp"` (linear, GELU, linear).
        kt_adapter_hidden_size (`int`, *optional*):
            Inner width of the `"mlp"` adapter; defaults to `teacher_hidden_size`.
        kt_encoder_layer (`int`, *optional*, defaults to -1):
            Which encoder output feeds the adapter, as an index into the encoder's hidden states (0: the projected
            features before the first layer, -1: the last layer, the one the CTC head reads). Other values than -1
            need `layerdrop=0` in training and `add_adapter=False`.
        teacher_hidden_size (`int`, *optional*, defaults to 384):
            Width `D_t` of the teacher's states (384 for all-MiniLM-L6-v2, 768 for bert-base).
        teacher_name_or_path (`str`, *optional*, defaults to `""`):
            The teacher's name or path, kept for the record (the model card shows it); the model never loads it.
        teacher_layer (`int`, *optional*, defaults to -1):
            The teacher layer whose states were used, kept for the record.
        kt_cuda_graphs (`bool`, *optional*, defaults to `False`):
            In training on a CUDA device, run the transfer after the adapter (cost, solver, pooling, loss and
            diagnostics, forward and backward) as captured CUDA graphs: a few launches per step instead of about
            500 small operations, whose launch latency otherwise dominates the transfer's cost. Frames are padded
            to 64, 96, 128, 192, 256, ... and tokens to 16, 24, 32, 48, 64, ...; one graph is kept per padded
            shape (at most 16, the least recently used dropped), each with its own device memory (about 150 MiB
            at wav2vec2-base size, 8 clips of 10 s). The padding changes the results only within the solver's
            tolerance. Each forward pass must be followed by its backward pass before the next forward pass of
            the same padded shape (an error says so otherwise), as in any training loop. The graphed
            transfer runs in float32 whatever the autocast, and the solver runs exactly
            `alignment_graph_iterations` iterations (a graph cannot stop early). Elsewhere (CPU, evaluation, no
            gradient, `nn.DataParallel` replicas) the setting is ignored. Needs the `"detach"` gradient mode and an
            aligner that never reads a value on the host; if capturing fails, the model warns once and goes on
            without graphs.
        alignment_graph_iterations (`int`, *optional*, defaults to 8):
            Solver iterations inside a captured graph (`kt_cuda_graphs`). An example that meets `alignment_tol`
            earlier is frozen at that point, so the plans equal those of the eager solver whenever every example
            converges within this budget; make it at least the iterations the eager solver reports
            (`benchmarks/bench_train_step.py` prints them). A multiple of 4, the solver's check interval, wastes
            nothing.
    """

    model_type = "wav2vec2-uot"
    # Extra outputs that evaluation loops should not gather with the logits.
    keys_to_ignore_at_inference = [
        "ctc_loss",
        "kt_loss",
        "alignments",
        "token_coverage",
        "dropped_frame_fraction",
        "transported_mass",
        "alignment_converged",
        "token_discrimination",
        "cost_spread_over_eps",
        "frames_per_token",
        "padding_mass",
        "hidden_states",
        "attentions",
    ]

    def __init__(
        self,
        aligner: str = "uot",
        alignment_eps: float = 0.1,
        rho_frames: Optional[float] = 1.0,
        rho_tokens: Optional[float] = None,
        matching_fraction: Optional[float] = None,
        temporal_order_weight: float = 0.0,
        alignment_anchor_weight: float = 0.0,
        alignment_anchor_gradient: bool = False,
        alignment_cost_scale: str = "none",
        teacher_centering: str = "none",
        alignment_max_iter: int = 200,
        alignment_tol: float = 1e-4,
        alignment_grad_mode: str = "detach",
        kt_weight: float = 0.5,
        kt_loss_type: str = "cosine",
        kt_temperature: float = 0.1,
        kt_warmup_steps: int = 0,
        kt_ramp_steps: int = 0,
        kt_adapter: str = "linear",
        kt_adapter_hidden_size: Optional[int] = None,
        kt_encoder_layer: int = -1,
        teacher_hidden_size: int = 384,
        teacher_name_or_path: str = "",
        teacher_layer: int = -1,
        kt_cuda_graphs: bool = False,
        alignment_graph_iterations: int = 8,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if not isinstance(aligner, str) or not aligner:
            raise ValueError(f"`aligner` must be one of {ALIGNER_CHOICES} or a registered aligner, got {aligner!r}.")
        if not (alignment_eps > 0 and math.isfinite(alignment_eps)):
            raise ValueError(f"`alignment_eps` must be a positive number, got {alignment_eps!r}.")
        if matching_fraction is not None:
            if not 0.0 < matching_fraction <= 1.0:
                raise ValueError(f"`matching_fraction` must lie in (0, 1], got {matching_fraction!r}.")
            rho_frames = rho_from_fraction(matching_fraction, alignment_eps)
        rho_frames, rho_tokens = _hard_as_none(rho_frames, "rho_frames"), _hard_as_none(rho_tokens, "rho_tokens")
        for name, value, choices in (
            ("kt_loss_type", kt_loss_type, KT_LOSS_CHOICES),
            ("kt_adapter", kt_adapter, ADAPTER_CHOICES),
            ("alignment_grad_mode", alignment_grad_mode, GRAD_MODE_CHOICES),
            ("alignment_cost_scale", alignment_cost_scale, COST_SCALE_CHOICES),
            ("teacher_centering", teacher_centering, TEACHER_CENTERING_CHOICES),
        ):
            if value not in choices:
                raise ValueError(f"`{name}` must be one of {choices}, got {value!r}.")
        if kt_weight < 0:
            raise ValueError(f"`kt_weight` must be non-negative, got {kt_weight!r}.")
        if temporal_order_weight < 0:
            raise ValueError(f"`temporal_order_weight` must be non-negative, got {temporal_order_weight!r}.")
        if not 0.0 <= alignment_anchor_weight <= 1.0:
            raise ValueError(f"`alignment_anchor_weight` must lie in [0, 1], got {alignment_anchor_weight!r}.")
        if not (kt_temperature > 0 and math.isfinite(kt_temperature)):
            raise ValueError(f"`kt_temperature` must be a positive number, got {kt_temperature!r}.")
        if kt_warmup_steps < 0 or kt_ramp_steps < 0:
            raise ValueError(
                f"`kt_warmup_steps` and `kt_ramp_steps` count steps, got {kt_warmup_steps!r} and {kt_ramp_steps!r}."
            )
        if teacher_hidden_size is None or teacher_hidden_size <= 0:
            raise ValueError(
                f"`teacher_hidden_size` must be the width of the teacher's states (e.g. 384 for all-MiniLM-L6-v2, "
                f"768 for bert-base), got {teacher_hidden_size!r}."
            )
        if isinstance(alignment_graph_iterations, bool) or not (
            isinstance(alignment_graph_iterations, int) and alignment_graph_iterations >= 1
        ):
            raise ValueError(
                f"`alignment_graph_iterations` must be a positive integer, got {alignment_graph_iterations!r}."
            )
        if kt_cuda_graphs and alignment_grad_mode != "detach":
            raise ValueError(
                f"kt_cuda_graphs needs alignment_grad_mode='detach': the {alignment_grad_mode!r} iteration reads its "
                "convergence checks on the host, which a CUDA graph cannot do."
            )
        if kt_encoder_layer != -1 and self.add_adapter:
            raise ValueError(
                "kt_encoder_layer must be -1 (the output) when add_adapter=True: inner layers are not downsampled by "
                "wav2vec2's output adapter, so their frames would not match the attention mask."
            )
        self.aligner = aligner
        self.alignment_eps = float(alignment_eps)
        self.rho_frames = rho_frames
        self.rho_tokens = rho_tokens
        self.temporal_order_weight = float(temporal_order_weight)
        self.alignment_anchor_weight = float(alignment_anchor_weight)
        self.alignment_anchor_gradient = bool(alignment_anchor_gradient)
        self.alignment_cost_scale = alignment_cost_scale
        self.teacher_centering = teacher_centering
        self.alignment_max_iter = int(alignment_max_iter)
        self.alignment_tol = float(alignment_tol)
        self.alignment_grad_mode = alignment_grad_mode
        self.kt_weight = float(kt_weight)
        self.kt_loss_type = kt_loss_type
        self.kt_temperature = float(kt_temperature)
        self.kt_warmup_steps = int(kt_warmup_steps)
        self.kt_ramp_steps = int(kt_ramp_steps)
        self.kt_adapter = kt_adapter
        self.kt_adapter_hidden_size = kt_adapter_hidden_size
        self.kt_encoder_layer = int(kt_encoder_layer)
        self.teacher_hidden_size = int(teacher_hidden_size)
        self.teacher_name_or_path = teacher_name_or_path
        self.teacher_layer = int(teacher_layer)
        self.kt_cuda_graphs = bool(kt_cuda_graphs)
        self.alignment_graph_iterations = alignment_graph_iterations

    def to_plain_config(self) -> Wav2Vec2Config:
        """This configuration without the transfer's fields: a stock `Wav2Vec2Config` (`model_type` "wav2vec2") for
        the same encoder and CTC head, what `Wav2Vec2ForCTCWithUOT.save_plain_pretrained` writes."""
        transfer_fields = set(inspect.signature(Wav2Vec2UOTConfig.__init__).parameters) - {"self", "kwargs"}
        saved_by_the_library = {"model_type", "architectures", "auto_map", "transformers_version"}
        settings = {
            key: value for key, value in self.to_dict().items()
            if key not in transfer_fields and key not in saved_by_the_library
        }
        return Wav2Vec2Config(**settings)

    @property
    def solver_settings(self) -> dict:
        """Keyword arguments for the aligner (`solve_uot`'s signature), with `None` read back as `inf`."""
        return dict(
            eps=self.alignment_eps,
            rho_frames=math.inf if self.rho_frames is None else self.rho_frames,
            rho_tokens=math.inf if self.rho_tokens is None else self.rho_tokens,
            temporal_order_weight=self.temporal_order_weight,
            max_iter=self.alignment_max_iter,
            tol=self.alignment_tol,
            grad_mode=self.alignment_grad_mode,
        )


def _hard_as_none(rho, name):
    if rho is None or (isinstance(rho, float) and math.isinf(rho) and rho > 0):
        return None
    if not (isinstance(rho, (int, float)) and rho >= 0 and math.isfinite(rho)):
        raise ValueError(f"`{name}` must be a non-negative number, or None / inf for a hard marginal, got {rho!r}.")
    return float(rho)
