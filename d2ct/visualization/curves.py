"""Training curves from Detectron2's metrics.json (one JSON object per logged iteration)."""
from __future__ import annotations

import json
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from d2ct.utils.fileio import atomic_path  # noqa: E402

LOSS_KEYS = ("total_loss", "loss_cls", "loss_box_reg", "loss_mask", "loss_rpn_cls", "loss_rpn_loc")
EVAL_KEYS = ("segm/AP", "segm/AP50", "ct/ARI", "ct/ARI_fg", "ct/Dice")


def read_metrics(path: str | Path) -> list[dict]:
    rows = []
    with open(path) as f:
        for line in f:
            line = line.strip()
            if line:
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError:
                    continue  # a line cut short by a kill
    return rows


def _series(rows: list[dict], key: str) -> tuple[list[int], list[float]]:
    xs, ys = [], []
    for row in rows:
        value = row.get(key)
        if isinstance(value, (int, float)) and math.isfinite(value) and "iteration" in row:
            xs.append(int(row["iteration"]))
            ys.append(float(value))
    # a resumed run logs some iterations twice: keep the last value for each
    merged = dict(zip(xs, ys))
    return sorted(merged), [merged[x] for x in sorted(merged)]


def plot_training_curves(metrics_json: str | Path, out_png: str | Path, title: str = "") -> Path | None:
    """Losses (log scale) on the left, validation AP/ARI/Dice on the right. None if nothing was logged."""
    rows = read_metrics(metrics_json)
    if not rows:
        return None
    fig, (ax_loss, ax_eval) = plt.subplots(1, 2, figsize=(12, 4.5))
    for key in LOSS_KEYS:
        xs, ys = _series(rows, key)
        if xs:
            ax_loss.plot(xs, ys, label=key, lw=2 if key == "total_loss" else 1)
    ax_loss.set_yscale("log")
    ax_loss.set_xlabel("iteration")
    ax_loss.set_title("training losses")
    ax_loss.legend(fontsize=8)
    ax_loss.grid(alpha=0.3)
    plotted = False
    for key in EVAL_KEYS:
        xs, ys = _series(rows, key)
        if xs:
            scale = 1.0 if key.startswith("segm/") else 100.0  # AP is in percent; ARI/Dice in [0, 1]
            ax_eval.plot(xs, [y * scale for y in ys], marker="o", label=key + ("" if scale == 1 else " x100"))
            plotted = True
    ax_eval.set_xlabel("iteration")
    ax_eval.set_title("validation (mask AP in %, ARI and Dice x100)")
    if plotted:
        ax_eval.legend(fontsize=8)
    else:
        ax_eval.text(0.5, 0.5, "no validation yet", ha="center", va="center", transform=ax_eval.transAxes)
    ax_eval.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    with atomic_path(out_png) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)
    return Path(out_png)
