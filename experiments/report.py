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
    """The degree-of-matching curve as numbers: each (eps, rho) on the trained models' costs, mean over seeds."""
    columns = ("dropped", "effective_frames", "mass_outside_words", "precision", "recall")
    lines = [
        "| model | eps | rho_frames | dropped frames | effective frames | mass outside words | plan precision "
        "| plan recall |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name in row_names:
        runs = [m for m in found.get(name, {}).values() if "rho_sweep" in m]
        for position, point in enumerate(runs[0]["rho_sweep"] if runs else []):
            rho = "inf (balanced)" if point["rho_frames"] is None else point["rho_frames"]
            cells = [mean_spread([m["rho_sweep"][position].get(k) for m in runs]) for k in columns]
            lines.append(f"| {name} (n={len(runs)}) | {point['eps']} | {rho} | " + " | ".join(cells) + " |")
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

    panels = (
        ("effective_frames", "effective frames (1: every frame its share)"),
        ("mass_outside_words", "mass on frames inside no word"),
        ("precision", "plan precision against word timings"),
    )
    figure, axes = plt.subplots(1, len(panels), figsize=(15, 4))
    for name in row_names:
        runs = [m for m in found.get(name, {}).values() if "rho_sweep" in m]
        if not runs:
            continue
        sweep = runs[0]["rho_sweep"]
        for eps in sorted({p["eps"] for p in sweep}, reverse=True):
            positions = [i for i, p in enumerate(sweep) if p["eps"] == eps]
            finite = [sweep[i]["rho_frames"] for i in positions if sweep[i]["rho_frames"] is not None]
            # Balanced transport (rho = inf) is drawn one decade past the grid.
            xs = finite + [finite[-1] * 10] * (len(positions) - len(finite))
            for axis, (key, _) in zip(axes, panels):
                ys = [np.mean([m["rho_sweep"][i].get(key, np.nan) for m in runs]) for i in positions]
                axis.plot(xs, ys, marker="o", label=f"{name}, eps {eps}")
    for axis, (_, title) in zip(axes, panels):
        axis.set_xscale("log")
        axis.set_xlabel("rho_frames (rightmost: balanced)")
        axis.set_title(title, fontsize=10)
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
