"""The transfer replayed from captured CUDA graphs (`Wav2Vec2UOTConfig.kt_cuda_graphs`), forward and backward.

On a GPU the eager transfer is bound by the launch latency of its many small kernels; replaying them from a graph
costs a few launches. The model hands `TransferGraphs` its transfer function (`transfer_terms`) and calls it with
the adapted frames; everything here is device state, not weights.
"""

from __future__ import annotations

import collections
from typing import Callable

import torch
from torch import nn
from transformers.utils import logging

logger = logging.get_logger(__name__)


class TransferGraphs:
    """`transfer_terms` replayed from captured CUDA graphs, forward and backward, one pair per padded shape.

    Why by hand: `torch.compile` would recompile for every new length, and `torch.cuda.make_graphed_callables`
    captures in the global mode, which a DataLoader's pin-memory thread can spoil mid-epoch, and hands back its
    gradients in buffers that the next replay overwrites (pytorch/pytorch#181723). Here inputs are padded to a few
    shapes, each shape is captured once in the thread-local mode (`_CapturedTerms`), outputs and gradients are
    copied out of the graph's buffers, and a failed capture falls back to the eager transfer with a warning. The
    adapter stays outside the graphs, so no parameter is ever an input of one.
    """

    # Padded sizes run 64, 96, 128, 192, 256, ... frames and 16, 24, 32, 48, 64, ... tokens: at most a third of a
    # dimension is padding, and lengths from 1 to 20 s of speech fit in about ten frame sizes.
    smallest_frames = 64
    smallest_tokens = 16
    max_graphs = 16

    def __init__(self, terms: Callable):
        self.terms = terms
        self.graphs: collections.OrderedDict = collections.OrderedDict()
        self.failed = False

    def __reduce__(self):
        # Graphs belong to one process and one model: a copy or a pickled model starts without any.
        return type(self), (self.terms,)

    def __call__(self, frames, frame_mask, teacher_states, token_mask):
        """The transfer terms from graphs, or `None` if capturing failed (the caller then runs them eagerly)."""
        if self.failed:
            return None
        n_frames, n_tokens = frames.shape[1], teacher_states.shape[1]
        pad_frames = padded_size(n_frames, self.smallest_frames) - n_frames
        pad_tokens = padded_size(n_tokens, self.smallest_tokens) - n_tokens
        # Captured and replayed outside autocast, on the inputs' device (a capture records the current device only).
        with torch.autocast(device_type="cuda", enabled=False), torch.cuda.device(frames.device):
            inputs = (
                nn.functional.pad(frames.float(), (0, 0, 0, pad_frames)),
                nn.functional.pad(frame_mask, (0, pad_frames)),
                nn.functional.pad(teacher_states.float(), (0, 0, 0, pad_tokens)),
                nn.functional.pad(token_mask, (0, pad_tokens)),
            )
            key = (frames.device, *(tuple(x.shape) for x in inputs))
            captured = self.graphs.get(key)
            if captured is None:
                captured = self._capture(key, inputs)
                if captured is None:
                    return None
            self.graphs.move_to_end(key)
            kt_loss, plans, stats = _ReplayTerms.apply(captured, *inputs)
        return kt_loss, plans[:, :n_frames, :n_tokens], stats

    def _capture(self, key, inputs):
        stream = torch.cuda.current_stream()
        try:
            captured = _CapturedTerms(self.terms, inputs)
        except Exception as error:  # a custom aligner that reads values on the host, an unsupported operation
            # A capture that fails inside `torch.cuda.graph` leaves its side stream current.
            torch.cuda.set_stream(stream)
            self.failed = True
            self.graphs.clear()
            logger.warning(
                "Capturing the transfer as a CUDA graph failed, so it runs eagerly from now on (kt_cuda_graphs is "
                "ignored until the transfer settings change): %s",
                error,
            )
            return None
        self.graphs[key] = captured
        if len(self.graphs) > self.max_graphs:
            self.graphs.popitem(last=False)
            logger.warning_once(
                f"More than {self.max_graphs} padded shapes of the transfer: the least recently used graph is dropped "
                "and will be captured again when its shape comes back. Batches grouped by length keep the number "
                "of shapes down."
            )
        return captured


class _CapturedTerms:
    """`transfer_terms` at one padded shape: static inputs, a forward graph and a backward graph from `kt_loss` to
    the frames (the only input with a gradient)."""

    def __init__(self, terms: Callable, inputs: tuple):
        self.inputs = tuple(x.detach().clone().requires_grad_(x.requires_grad) for x in inputs)
        frames = self.inputs[0]
        # Warm-up on a side stream, so that lazy initialisation (kernels, workspaces) stays out of the capture.
        torch.cuda.synchronize()
        side = torch.cuda.Stream()
        with torch.cuda.stream(side):
            for _ in range(2):
                torch.autograd.grad(terms(*self.inputs)[0], frames)
        torch.cuda.synchronize()
        pool = torch.cuda.graph_pool_handle()
        # Thread-local: CUDA calls of other threads (a DataLoader pinning memory) cannot spoil the capture.
        self.forward_graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.forward_graph, pool=pool, capture_error_mode="thread_local"):
            self.outputs = terms(*self.inputs)
        self.grad_loss = torch.zeros_like(self.outputs[0])
        self.backward_graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.backward_graph, pool=pool, capture_error_mode="thread_local"):
            (self.grad_frames,) = torch.autograd.grad(self.outputs[0], frames, self.grad_loss)
        # Counts forward replays, so that a backward can tell whether its activations were overwritten.
        self.replays = 0


class _ReplayTerms(torch.autograd.Function):
    """Replays a `_CapturedTerms`: `(kt_loss, plans, stats)` forward, the frames' gradient backward."""

    @staticmethod
    def forward(ctx, captured, frames, frame_mask, teacher_states, token_mask):
        for static, value in zip(captured.inputs, (frames, frame_mask, teacher_states, token_mask)):
            static.copy_(value)
        captured.forward_graph.replay()
        captured.replays += 1
        ctx.captured, ctx.replay = captured, captured.replays
        # Copies: the next replay overwrites the graph's outputs.
        kt_loss, plans, stats = (output.detach().clone() for output in captured.outputs)
        ctx.mark_non_differentiable(plans, stats)
        return kt_loss, plans, stats

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss, grad_plans, grad_stats):
        captured = ctx.captured
        if captured.replays != ctx.replay:
            raise RuntimeError(
                "The graphed transfer ran again, on a batch of the same padded shape, before the backward pass of "
                "an earlier forward pass: its saved activations are gone. Call backward after each forward, or set "
                "kt_cuda_graphs=False."
            )
        captured.grad_loss.copy_(grad_loss)
        captured.backward_graph.replay()
        return None, captured.grad_frames.clone(), None, None, None


def padded_size(size: int, smallest: int) -> int:
    """The least of `smallest * 2**k` and `1.5 * smallest * 2**k` (k >= 0) that is at least `size`; `smallest` is a
    power of two."""
    padded = smallest
    while padded < size:
        padded = padded * 3 // 2 if padded & (padded - 1) == 0 else padded * 4 // 3
    return padded
