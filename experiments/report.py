"""Tables and plots of docs/RESULTS.md from the runs' `experiment_metrics.json` (see run_experiments.py).

The tables are written between marker comments in docs/RESULTS.md, so that the prose around them stays as written;
the plots go to docs/results/.
"""

from __future__ import annotations

import math
import os
import re

import numpy as np

TABLE_START, TABLE_END = "<!-- results-table:start -->", "<!-- results-table:end -->"


def mean_spread(values) -> str:
    """`mean ± sample standard deviation (n)`; a lone value gets no spread."""
    values = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not values:
        return "–"
    if len(values) == 1:
        return f"{values[0]:.3f} (n=1)"
    return f"{np.mean(values):.3f} ± {np.std(values, ddof=1):.3f}"


def paired_difference(found, row_name, baseline_name, key="wer"):
    """Mean and spread of `row - baseline` over the seeds both have (same seed: same initial weights and batches)."""
    row, base = found.get(row_name, {}), found.get(baseline_name, {})
    seeds = sorted(set(row) & set(base))
    return [row[s][key] - base[s][key] for s in seeds]


def table(found, rows) -> str:
    from run_experiments import row_command

    header = (
        "| row | regime | seeds | WER | CER | WER seen voices | WER unseen voices | ΔWER vs CTC (paired) "
        "| plan precision | plan recall | dropped frames | transported mass | train min | command |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n"
    )
    lines = []
    for row in rows.values():
        runs = found.get(row.name, {})
        if not runs:
            lines.append(f"| {row.name} | {row.regime} | 0 | not run yet | | | | | | | | | | `{row_command(row)}` |")
            continue
        values = list(runs.values())
        pick = lambda key: [m.get(key) for m in values]  # noqa: E731
        align = lambda key: [m["alignment"][key] for m in values if "alignment" in m]  # noqa: E731
        baseline = {"clean": "ctc", "padded": "padded_ctc", "low-resource": "low_ctc"}[row.regime]
        delta = paired_difference(found, row.name, baseline) if row.name != baseline else []
        lines.append(
            f"| {row.name} | {row.regime} | {len(runs)} | {mean_spread(pick('wer'))} | {mean_spread(pick('cer'))} "
            f"| {mean_spread(pick('wer_seen'))} | {mean_spread(pick('wer_unseen'))} "
            f"| {mean_spread(delta) if delta else '–'} "
            f"| {mean_spread(align('precision'))} | {mean_spread(align('recall'))} "
            f"| {mean_spread(align('dropped'))} | {mean_spread(align('mass'))} "
            f"| {np.mean([m.get('train_minutes') or 0 for m in values]):.1f} | `{row_command(row)}` |"
        )
    return header + "\n".join(lines) + "\n"


def sweep_table(found, row_names) -> str:
    """The degree-of-matching curve as numbers: each rho on the trained models' costs, mean over seeds."""
    lines = [
        "| model | rho_frames | dropped frames | transported mass | plan precision | plan recall |",
        "|---|---|---|---|---|---|",
    ]
    for name in row_names:
        runs = [m for m in found.get(name, {}).values() if "rho_sweep" in m]
        if not runs:
            continue
        for position, point in enumerate(runs[0]["rho_sweep"]):
            rho = point["rho_frames"]
            cells = [
                mean_spread([m["rho_sweep"][position][k] for m in runs])
                for k in ("dropped", "mass", "precision", "recall")
            ]
            lines.append(
                f"| {name} (n={len(runs)}) | {'inf (balanced)' if rho is None else rho} | " + " | ".join(cells) + " |"
            )
    return "\n".join(lines) + "\n"


def plot_wer(found, rows, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [name for name in rows if found.get(name)]
    figure, axis = plt.subplots(figsize=(max(6, 0.6 * len(names) + 2), 4))
    for position, name in enumerate(names):
        values = [m["wer"] for m in found[name].values()]
        axis.bar(position, np.mean(values), color="#9ab", width=0.7)
        axis.scatter([position] * len(values), values, color="#124", s=12, zorder=3)
    axis.set_xticks(range(len(names)), names, rotation=60, ha="right")
    axis.set_ylabel("test WER (bar: mean, dots: seeds)")
    axis.set_title("Word error rate per row")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def plot_degree_of_matching(found, row_names, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(11, 4))
    for name in row_names:
        runs = [m for m in found.get(name, {}).values() if "rho_sweep" in m]
        if not runs:
            continue
        sweep = runs[0]["rho_sweep"]
        finite = [p["rho_frames"] for p in sweep if p["rho_frames"] is not None]
        # Balanced transport (rho = inf) is drawn at the right edge, one decade past the grid.
        xs = finite + [finite[-1] * 10]
        series = {
            k: np.mean([[p[k] for p in m["rho_sweep"]] for m in runs], axis=0) for k in sweep[0] if k != "rho_frames"
        }
        axes[0].plot(xs, series["dropped"], marker="o", label=f"{name}: dropped frames")
        axes[0].plot(xs, series["mass"], marker="s", linestyle="--", label=f"{name}: transported mass")
        axes[1].plot(xs, series["precision"], marker="o", label=f"{name}: precision")
        axes[1].plot(xs, series["recall"], marker="s", linestyle="--", label=f"{name}: recall")
    for axis, title in zip(axes, ("Degree of matching", "Plan against word timings")):
        axis.set_xscale("log")
        axis.set_xlabel("rho_frames (rightmost point: balanced, rho = inf)")
        axis.set_title(title)
        axis.grid(alpha=0.3)
        axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def write_report(found, rows, output: str) -> None:
    """Write the plots into `<output>/results/` and the tables into `<output>/RESULTS.md` between the markers."""
    os.makedirs(os.path.join(output, "results"), exist_ok=True)
    plot_wer(found, rows, os.path.join(output, "results", "wer.png"))
    curve_rows = ["uot_rho1.0", "padded_uot_rho1.0"]
    plot_degree_of_matching(found, curve_rows, os.path.join(output, "results", "degree_of_matching.png"))
    generated = (
        f"{TABLE_START}\n<!-- written by `python experiments/run_experiments.py report`; edit the prose only -->\n\n"
        + table(found, rows)
        + "\n#### Degree of matching on the trained models' own costs\n\n"
        + sweep_table(found, curve_rows)
        + f"\n{TABLE_END}"
    )
    path = os.path.join(output, "RESULTS.md")
    text = (
        open(path, encoding="utf-8").read() if os.path.isfile(path) else f"# Results\n\n{TABLE_START}\n{TABLE_END}\n"
    )
    if TABLE_START not in text:
        text += f"\n{TABLE_START}\n{TABLE_END}\n"
    text = re.sub(re.escape(TABLE_START) + ".*?" + re.escape(TABLE_END), lambda _: generated, text, flags=re.S)
    with open(path, "w", encoding="utf-8") as handle:
        handle.write(text)
    print(f"wrote {path} and {output}/results/*.png ({sum(len(v) for v in found.values())} runs)")
