"""A picture of a transport plan: frames on one axis, the transcript's tokens on the other."""

from __future__ import annotations

import os
from typing import Optional, Sequence, Union

import numpy as np
import torch


def plot_alignment(
    plan: Union[torch.Tensor, np.ndarray],
    path: Union[str, os.PathLike],
    tokens: Optional[Sequence[str]] = None,
    frame_rate: Optional[float] = None,
    title: Optional[str] = None,
    dpi: int = 100,
    word_timings: Optional[Sequence[tuple[str, float, float]]] = None,
):
    """Write a frames x tokens heat map of one plan to a PNG file and return the matplotlib figure.

    Args:
        plan: one example's plan, shape `(T, N)`, padding already cut away.
        path: where to write the PNG.
        tokens: the `N` token strings, shown on the token axis (default: their indices).
        frame_rate: frames per second; when given, the frame axis is labelled in seconds.
        title: optional title.
        dpi: resolution of the file.
        word_timings: the spoken words as `(word, start_s, end_s)`, e.g. a corpus's timings; drawn as dashed
            boundaries with each word written above its span, so that a reader sees whether each token's mass
            falls within its word. Needs `frame_rate`.

    Each plan entry is one cell of the image (`figure.axes[0].images[0]` holds the `(N, T)` array); the colour is
    the mass divided by the token's total, so each token row reads as a distribution over frames.
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    plan = plan.detach().float().cpu().numpy() if isinstance(plan, torch.Tensor) else np.asarray(plan, float)
    if plan.ndim != 2:
        raise ValueError(f"`plan` must be one example's (frames, tokens) matrix, got shape {plan.shape}.")
    n_frames, n_tokens = plan.shape
    if tokens is not None and len(tokens) != n_tokens:
        raise ValueError(f"{len(tokens)} token strings for a plan with {n_tokens} tokens.")
    if word_timings is not None and not frame_rate:
        raise ValueError("`word_timings` are in seconds: give `frame_rate` too.")
    per_token = plan.T / np.maximum(plan.sum(0)[:, None], 1e-30)

    width = min(40.0, 2.0 + 0.04 * n_frames)
    height = min(30.0, 1.5 + 0.25 * n_tokens + (1.0 if word_timings else 0.0))
    figure, axes = plt.subplots(figsize=(width, height))
    extent = None
    if frame_rate:
        extent = (0.0, n_frames / frame_rate, n_tokens - 0.5, -0.5)
    axes.imshow(per_token, aspect="auto", interpolation="nearest", cmap="magma", extent=extent)
    axes.set_yticks(range(n_tokens))
    axes.set_yticklabels(list(tokens) if tokens is not None else [str(j) for j in range(n_tokens)])
    axes.set_xlabel("time (s)" if frame_rate else "frame")
    axes.set_ylabel("token")
    if word_timings:
        for _, start, end in word_timings:
            for edge in (start, end):
                axes.axvline(edge, color="white", linestyle="--", linewidth=0.8, alpha=0.7)
        axes.set_xlim(extent[0], extent[1])  # the lines must not widen the picture beyond the frames
        words = axes.secondary_xaxis("top")
        words.set_xticks([(start + end) / 2 for _, start, end in word_timings])
        words.set_xticklabels([word for word, _, _ in word_timings], rotation=45, ha="left")
        words.tick_params(axis="x", labelsize=8)
    if title:
        axes.set_title(title, pad=45 if word_timings else 6)  # above the word labels
    figure.tight_layout()
    figure.savefig(os.fspath(path), dpi=dpi)
    plt.close(figure)
    return figure
