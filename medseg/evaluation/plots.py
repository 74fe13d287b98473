"""PNG plots of a comparison: metric bars per run and label (with sd error bars), and learning curves.

Figures are drawn with matplotlib's object API on the Agg canvas: no pyplot state, no display needed.
matplotlib is imported on first use.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from medseg.errors import optional_import
from medseg.io.atomic import atomic_path

_BAR_GROUP_WIDTH = 0.8


def _figure(width: float, height: float) -> Any:
    optional_import("matplotlib", "comparison plots", "plots")
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Any, path: Path) -> Path:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    return path


def plot_metric_bars(
    bars: Mapping[str, Mapping[str, Mapping[str, tuple[float, float]]]], path: str | Path
) -> Path:
    """One panel per metric: a group of bars per run, a bar per label, sd as error bars.

    Args:
        bars: Metric base -> run label -> label -> ``(mean, sd)`` (sd NaN: no error bar), as
            :meth:`~medseg.evaluation.compare.Comparison.bars` gives.
        path: Destination ``.png``.

    Returns:
        The written path.
    """
    metrics = list(bars)
    n_runs = max(len(bars[m]) for m in metrics) if metrics else 1
    fig = _figure(max(6.0, 1.1 * n_runs + 4.0), 3.2 * max(1, len(metrics)))
    axes = fig.subplots(max(1, len(metrics)), 1, squeeze=False)[:, 0]
    for ax, metric in zip(axes, metrics):
        runs = list(bars[metric])  # only the runs that logged this metric
        labels = list(dict.fromkeys(lab for run in bars[metric].values() for lab in run))
        width = _BAR_GROUP_WIDTH / max(1, len(labels))
        for j, label in enumerate(labels):
            xs, heights, errors = [], [], []
            for i, run in enumerate(runs):
                mean, sd = bars[metric][run].get(label, (math.nan, math.nan))
                if not math.isfinite(mean):
                    continue
                xs.append(i - _BAR_GROUP_WIDTH / 2 + (j + 0.5) * width)
                heights.append(mean)
                errors.append(sd if math.isfinite(sd) else math.nan)  # NaN: no error bar
            ax.bar(xs, heights, width=width * 0.95, yerr=errors, capsize=3, label=label)
        ax.set_xticks(range(len(runs)), runs, rotation=20, ha="right")
        ax.set_title(metric)
        ax.set_ylabel(f"{metric} (mean ± sd)")
        ax.grid(axis="y", alpha=0.3)
        if len(labels) > 1:
            ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return _save(fig, Path(path))


def plot_learning_curves(
    histories: Mapping[str, Mapping[str, Sequence[tuple[int, float]]]], path: str | Path
) -> Path:
    """One panel per metric key (e.g. ``train_loss``, ``val_dice_mean``), one line per run, by step.

    Args:
        histories: Run label -> metric key -> ``(step, value)`` points.
        path: Destination ``.png``.

    Returns:
        The written path.
    """
    keys = list(dict.fromkeys(k for run in histories.values() for k in run))
    fig = _figure(7.0, 3.0 * max(1, len(keys)))
    axes = fig.subplots(max(1, len(keys)), 1, squeeze=False)[:, 0]
    for ax, key in zip(axes, keys):
        for run, series in histories.items():
            points = sorted(series.get(key, []))
            if points:
                steps, values = zip(*points)
                ax.plot(steps, values, marker="o" if len(points) < 30 else None, markersize=3, label=run)
        ax.set_title(key)
        ax.set_xlabel("step (epoch)")
        ax.set_ylabel(key)
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return _save(fig, Path(path))
