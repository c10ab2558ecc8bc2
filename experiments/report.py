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


def mean_spread(values, digits: int = 3) -> str:
    """`mean ± sample standard deviation (n)`; a lone value gets no spread."""
    values = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not values:
        return "–"
    if len(values) == 1:
        return f"{values[0]:.{digits}f} (n=1)"
    return f"{np.mean(values):.{digits}f} ± {np.std(values, ddof=1):.{digits}f}"


def paired_difference(found, row_name, baseline_name, key="wer"):
    """Mean and spread of `row - baseline` over the seeds both have (same seed: same initial weights and batches)."""
    row, base = found.get(row_name, {}), found.get(baseline_name, {})
    seeds = sorted(set(row) & set(base))
    return [row[s][key] - base[s][key] for s in seeds]


BASELINES = {"clean": "ctc", "padded": "padded_ctc", "low-resource": "low_ctc"}


def t_interval(values) -> tuple:
    """The 95 % t-interval of the mean of `values` (at least two)."""
    from scipy import stats

    half = stats.t.ppf(0.975, len(values) - 1) * np.std(values, ddof=1) / math.sqrt(len(values))
    return np.mean(values) - half, np.mean(values) + half


def paired_cell(differences, digits: int = 3) -> str:
    """`mean ± sd [each seed's difference] 95 % t-interval` of paired differences."""
    if not differences:
        return "–"
    cell = f"{mean_spread(differences, digits)} [{', '.join(f'{d:+.{digits}f}' for d in differences)}]"
    if len(differences) >= 2:
        low, high = t_interval(differences)
        cell += f", 95 % CI {low:+.{digits}f} to {high:+.{digits}f}"
    return cell


def table(found, rows) -> str:
    """The recognition table: WER and CER per row (mean ± sample sd over seeds), paired differences to the regime's
    CTC row, and each row's command."""
    lines = [
        "| row | regime | seeds | WER | CER | WER seen voices | WER unseen voices | ΔWER vs CTC, paired by seed "
        "| ΔCER vs CTC, paired by seed | train min | command |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows.values():
        runs = found.get(row.name, {})
        if not runs:
            lines.append(f"| {row.name} | {row.regime} | 0 | not run yet | | | | | | | `{row.command}` |")
            continue
        values = list(runs.values())
        pick = lambda key: [m.get(key) for m in values]  # noqa: E731
        baseline = BASELINES[row.regime]
        paired = row.name != baseline
        minutes = [m["train_minutes"] for m in values if m.get("train_minutes") and not m.get("train_resumed")]
        lines.append(
            f"| {row.name} | {row.regime} | {len(runs)} | {mean_spread(pick('wer'))} | {mean_spread(pick('cer'))} "
            f"| {mean_spread(pick('wer_seen'))} | {mean_spread(pick('wer_unseen'))} "
            f"| {paired_cell(paired_difference(found, row.name, baseline)) if paired else '–'} "
            f"| {paired_cell(paired_difference(found, row.name, baseline, 'cer')) if paired else '–'} "
            f"| {f'{np.mean(minutes):.1f}' if minutes else 'resumed'} | `{row.command}` |"
        )
    return "\n".join(lines) + "\n"


def alignment_table(found, rows) -> str:
    """The alignment table for rows with an aligner: the training plan scored against the word timings."""
    lines = [
        "| row | plan precision | plan recall | diagonal plan precision | dropped frames | effective frames "
        "| mass outside words | frame-fit spread / eps |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in rows.values():
        values = [m for m in found.get(row.name, {}).values() if "alignment" in m]
        if not values:
            continue
        align = lambda key, part="alignment": [m[part].get(key) for m in values]  # noqa: E731
        cells = [mean_spread(align(k)) for k in ("precision", "recall")]
        cells.append(mean_spread(align("precision", "alignment_diagonal")))
        cells += [mean_spread(align(k)) for k in ("dropped", "effective_frames", "mass_outside_words")]
        cells.append(mean_spread([m.get("frame_fit_spread_over_eps") for m in values]))
        lines.append(f"| {row.name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def sweep_points(metrics) -> dict:
    """A run's degree-of-matching curve keyed by `(eps, rho_frames)` (`None` for balanced), in the run's order."""
    return {(point["eps"], point["rho_frames"]): point for point in metrics["rho_sweep"]}


def sweep_table(found, row_names) -> str:
    """The degree-of-matching curve as numbers: each (eps, rho) on the trained models' costs, mean over seeds."""
    columns = ("dropped", "mass", "effective_frames", "mass_outside_words", "precision", "recall")
    lines = [
        "| model | eps | rho_frames | dropped frames | total mass | effective frames | mass outside words "
        "| plan precision | plan recall |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name in row_names:
        runs = [sweep_points(m) for m in found.get(name, {}).values() if "rho_sweep" in m]
        for key in runs[0] if runs else []:
            eps, rho = key
            label = "inf (balanced)" if rho is None else rho
            cells = [mean_spread([points[key].get(k) for points in runs if key in points]) for k in columns]
            lines.append(f"| {name} (n={len(runs)}) | {eps} | {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_wer(found, rows, path) -> None:
    """Left: each row's test WER (dots: seeds, bar: mean). Right: the paired change against its CTC row."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [name for name in rows if found.get(name)]
    compared = [name for name in names if name != BASELINES[rows[name].regime]]
    figure, (left, right) = plt.subplots(1, 2, figsize=(max(10, 0.9 * len(names) + 4), 4.5))
    all_values = []
    for position, name in enumerate(names):
        values = [m["wer"] for m in found[name].values()]
        all_values += values
        left.bar(position, np.mean(values), color="#9ab", width=0.7)
        left.scatter([position] * len(values), values, color="#124", s=14, zorder=3)
    left.set_xticks(range(len(names)), names, rotation=60, ha="right")
    if all_values:
        left.set_ylim(min(all_values) - 0.05, max(all_values) + 0.03)
    left.set_ylabel("test WER")
    left.set_title("WER per row (bar: mean over seeds, dots: seeds)", fontsize=10)
    for position, name in enumerate(compared):
        differences = paired_difference(found, name, BASELINES[rows[name].regime])
        if differences:
            right.bar(position, np.mean(differences), color="#c97", width=0.7)
            right.scatter([position] * len(differences), differences, color="#421", s=14, zorder=3)
    right.axhline(0.0, color="black", linewidth=0.8)
    right.set_xticks(range(len(compared)), compared, rotation=60, ha="right")
    right.set_ylabel("WER minus CTC-only WER, same seed")
    right.set_title("Change against CTC only in the same regime (below 0: better)", fontsize=10)
    for axis in (left, right):
        axis.grid(axis="y", alpha=0.3)
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
        curves = [sweep_points(m) for m in runs]
        for eps in sorted({eps for eps, _ in curves[0]}, reverse=True):
            keys = [key for key in curves[0] if key[0] == eps]
            finite = [rho for _, rho in keys if rho is not None]
            # Balanced transport (rho = inf) is drawn one decade past the grid.
            xs = finite + [finite[-1] * 10] * (len(keys) - len(finite))
            for axis, (score, _) in zip(axes, panels):
                ys = [np.nanmean([curve[key].get(score, np.nan) for curve in curves if key in curve]) for key in keys]
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


def write_between_markers(path: str, start: str, end: str, generated: str) -> None:
    """Replace what lies between the markers `start` and `end` in the Markdown file `path` (both markers included)
    by `generated`, which holds them too; a file without the markers gets them at its end, a missing file is made."""
    text = open(path, encoding="utf-8").read() if os.path.isfile(path) else "# Results\n"
    if start not in text:
        text += f"\n{start}\n{end}\n"
    text = re.sub(re.escape(start) + ".*?" + re.escape(end), lambda _: generated, text, flags=re.S)
    with open(path, "w", encoding="utf-8") as handle:
        handle.write(text)


def write_report(found, rows, output: str) -> None:
    """Write the plots into `<output>/results/` and the tables into `<output>/RESULTS.md` between the markers."""
    os.makedirs(os.path.join(output, "results"), exist_ok=True)
    plot_wer(found, rows, os.path.join(output, "results", "wer.png"))
    curve_rows = ["uot_rho1.0", "padded_uot_rho1.0", "padded_ot"]
    plot_degree_of_matching(found, curve_rows, os.path.join(output, "results", "degree_of_matching.png"))
    generated = (
        f"{TABLE_START}\n<!-- written by `python experiments/run_experiments.py report`; edit the prose only -->\n\n"
        + table(found, rows)
        + "\n#### The transport plans against the word timings (rows with an aligner)\n\n"
        + alignment_table(found, rows)
        + "\n#### Degree of matching on the trained models' own costs\n\n"
        + sweep_table(found, curve_rows)
        + f"\n{TABLE_END}"
    )
    path = os.path.join(output, "RESULTS.md")
    write_between_markers(path, TABLE_START, TABLE_END, generated)
    print(f"wrote {path} and {output}/results/*.png ({sum(len(v) for v in found.values())} runs)")


TRANSFER_START, TRANSFER_END = "<!-- transfer-table:start -->", "<!-- transfer-table:end -->"


def relative_cell(differences, baseline_values) -> str:
    """The paired CER change as a share of the baseline's mean CER, with its 95 % interval."""
    if len(differences) < 2 or not baseline_values:
        return "–"
    base = np.mean(baseline_values)
    low, high = t_interval(differences)
    return f"{np.mean(differences) / base:+.1%} (95 % CI {low / base:+.1%} to {high / base:+.1%})"


def transfer_table(found, rows, regime: str, baseline: str) -> str:
    """Stage 2: CER and WER of each row against CTC only (paired by seed), and its plans against the word timings:
    precision, recall, dropped frames, mass on the padding, token discrimination (its chance level beside it)."""
    lines = [
        "| row | seeds | CER | WER | ΔCER vs CTC, paired by seed | ΔCER relative | plan precision | plan recall "
        "| dropped frames | mass on padding | token discrimination (chance) | frames per token | command |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    base_cer = [m["cer"] for m in found.get(baseline, {}).values()]
    for row in (r for r in rows.values() if r.regime == regime):
        runs = found.get(row.name, {})
        if not runs:
            lines.append(f"| {row.name} | 0 | not run yet | | | | | | | | | | `{row.command}` |")
            continue
        values = list(runs.values())
        pick = lambda key: [m.get(key) for m in values]  # noqa: E731
        aligned = [m for m in values if "alignment" in m]
        align = lambda key: [m["alignment"].get(key) for m in aligned]  # noqa: E731
        tool = lambda key: [m.get("instruments", {}).get(key) for m in aligned]  # noqa: E731
        differences = paired_difference(found, row.name, baseline, "cer") if row.name != baseline else []
        cells = [
            # Four digits: fine-tuning rows differ from each other by thousandths.
            str(len(runs)), mean_spread(pick("cer"), 4), mean_spread(pick("wer"), 4),
            paired_cell(differences, 4) if differences else "–", relative_cell(differences, base_cer),
        ]
        if aligned:
            cells += [mean_spread(align(k)) for k in ("precision", "recall", "dropped", "mass_outside_words")]
            cells.append(f"{mean_spread(tool('token_discrimination'))} ({np.mean(tool('discrimination_chance')):.2f})")
            cells.append(mean_spread(tool("frames_per_token"), 1))
        else:
            cells += ["–"] * 6
        lines.append(f"| {row.name} | " + " | ".join(cells) + f" | `{row.command}` |")
    return "\n".join(lines) + "\n"


def reference_plans_line(found, row_name: str) -> str:
    """The precision and recall of the two plans that know nothing about the sound, on the same utterances."""
    runs = [m for m in found.get(row_name, {}).values() if "alignment_diagonal" in m]
    if not runs:
        return ""
    parts = []
    for key, label in (("alignment_diagonal", "diagonal plan"), ("alignment_temporal_prior", "temporal-order plan")):
        scores = [m[key] for m in runs if key in m]
        if scores:
            parts.append(
                f"{label}: precision {np.mean([s['precision'] for s in scores]):.3f}, recall "
                f"{np.mean([s['recall'] for s in scores]):.3f}, mass on padding "
                f"{np.mean([s['mass_outside_words'] for s in scores]):.3f}"
            )
    return "Plans that ignore the sound, on the same utterances: " + "; ".join(parts) + ".\n"


def base_line(base_metrics) -> str:
    if not base_metrics:
        return "Stage 1: not run yet (`python experiments/run_experiments.py base`).\n"
    return (
        f"Stage 1 base model on its own test split ({base_metrics['test_utterances']} held-out sentences, voices "
        f"heard in training): CER {base_metrics['cer']:.3f}, WER {base_metrics['wer']:.3f} "
        f"(`python experiments/run_experiments.py base`).\n"
    )


def lm_table(found_lm, rows, baseline: str = "target_ctc") -> str:
    """Greedy and n-gram decoding of the same runs: CER and WER, each against the baseline row's greedy decoding
    (paired by seed, relative with its 95 % interval), decoding time, the weights chosen on the validation corpus."""
    lines = [
        "| row | decoding | seeds | CER | WER | ΔWER vs CTC greedy, relative | ΔCER vs CTC greedy, relative "
        "| s per s of audio | LM weight, word bonus (validation WER) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    base = found_lm.get(baseline, {})
    for name in rows:
        runs = found_lm.get(name, {})
        for decoding in ("greedy", "lm"):
            if not runs:
                lines.append(f"| {name} | {decoding} | 0 | not run yet | | | | | |")
                continue
            seeds = sorted(set(runs) & set(base))
            cells = [str(len(runs)), mean_spread([m[decoding]["cer"] for m in runs.values()], 4),
                     mean_spread([m[decoding]["wer"] for m in runs.values()], 4)]
            for key in ("wer", "cer"):
                differences = [runs[s][decoding][key] - base[s]["greedy"][key] for s in seeds]
                baseline_values = [base[s]["greedy"][key] for s in seeds]
                same = name == baseline and decoding == "greedy"
                cells.append("–" if same else relative_cell(differences, baseline_values))
            cells.append(f"{np.mean([m[decoding]['seconds_per_audio_second'] for m in runs.values()]):.4f}")
            if decoding == "lm":
                weights = sorted({(m["alpha"], m["beta"]) for m in runs.values()})
                validation = np.mean([m["validation_wer"] for m in runs.values()])
                cells.append(f"{'; '.join(f'{a:g}, {b:g}' for a, b in weights)} ({validation:.3f})")
            else:
                cells.append("–")
            label = "3-gram LM" if decoding == "lm" else "greedy"
            lines.append(f"| {name} | {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def lm_contrast_line(found_lm, row: str, baseline: str = "target_ctc") -> str:
    """The transfer against CTC alone when both decode with the language model, paired by seed."""
    runs, base = found_lm.get(row, {}), found_lm.get(baseline, {})
    seeds = sorted(set(runs) & set(base))
    if len(seeds) < 2:
        return ""
    parts = []
    for key in ("wer", "cer"):
        differences = [runs[s]["lm"][key] - base[s]["lm"][key] for s in seeds]
        parts.append(f"{key.upper()} {relative_cell(differences, [base[s]['lm'][key] for s in seeds])}")
    return f"With the language model on both sides, {row} against {baseline}: " + "; ".join(parts) + ".\n"


LM_START, LM_END = "<!-- lm-table:start -->", "<!-- lm-table:end -->"


def write_lm_report(found_lm, rows, output: str) -> None:
    """Write the greedy-against-LM table of `rows` into `<output>/RESULTS.md` between its markers (added at the end
    when missing)."""
    generated = (
        f"{LM_START}\n<!-- written by `python experiments/run_experiments.py lm-report` from each run's "
        "lm_metrics.json (`python experiments/run_experiments.py lm`); edit the prose only -->\n\n"
        + lm_table(found_lm, rows)
        + "\n" + lm_contrast_line(found_lm, rows[-1], rows[0]) + f"{LM_END}"
    )
    path = os.path.join(output, "RESULTS.md")
    write_between_markers(path, LM_START, LM_END, generated)
    print(f"wrote the n-gram table of {path} ({sum(len(v) for v in found_lm.values())} runs)")


def write_transfer_report(found, rows, base_metrics, output: str) -> None:
    """Write the transfer experiments' tables into `<output>/RESULTS.md` between their markers, and the
    degree-of-matching plot of the chosen row into `<output>/results/`."""
    os.makedirs(os.path.join(output, "results"), exist_ok=True)
    curve_rows = ["target_uot_anchor"]
    plot_degree_of_matching(found, curve_rows, os.path.join(output, "results", "transfer_degree_of_matching.png"))
    generated = (
        f"{TRANSFER_START}\n<!-- written by `python experiments/run_experiments.py transfer-report`; edit the prose "
        "only -->\n\n"
        + base_line(base_metrics)
        + "\n#### Stage 2 on the target's test split (200 utterances, five seeds)\n\n"
        + transfer_table(found, rows, "target", "target_ctc")
        + "\n"
        + reference_plans_line(found, "target_uot_anchor")
        + "\n#### Degree of matching on the chosen row's own costs (test split)\n\n"
        + sweep_table(found, curve_rows)
        + "\n#### Choosing the settings: every variant on the validation split (100 training utterances held out)\n\n"
        + transfer_table(found, rows, "target-tune", "tune_ctc")
        + f"\n{TRANSFER_END}"
    )
    path = os.path.join(output, "RESULTS.md")
    write_between_markers(path, TRANSFER_START, TRANSFER_END, generated)
    print(f"wrote {path} and {output}/results/transfer_degree_of_matching.png")
