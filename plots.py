"""Plots of a training run: the loss and metric curves from ``training_results.csv`` and the confusion matrix as
PNGs, drawn on matplotlib's Agg canvas (no pyplot state).
"""

from __future__ import annotations

import pathlib
from typing import Sequence

import numpy as np

from metrics import _full_names


def plot_training_history(results_csv, output_dir) -> None:
    """losses.png and metrics.png in ``output_dir`` from main.py's training_results.csv."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg   # as plot_confusion_matrix: no pyplot state
    from matplotlib.figure import Figure
    import pandas as pd

    table = pd.read_csv(results_csv)
    for name, columns in (("losses", ["train_loss", "val_loss"]),
                          ("metrics", ["video_acc", "det_acc_50", "mean_iou", "map50", "map50_95"])):
        fig = Figure(figsize=(7, 4))
        FigureCanvasAgg(fig)
        ax = fig.add_subplot(1, 1, 1)
        for column in columns:
            rows = table[["epoch", column]].dropna()
            if len(rows):
                ax.plot(rows["epoch"], rows[column], marker="o", label=column)
        ax.set_xlabel("epoch")
        ax.set_title(name)
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(pathlib.Path(output_dir) / f"{name}.png", dpi=100)


def plot_confusion_matrix(cm, class_names: Sequence[str], path, title: str = "Confusion matrix") -> None:
    """Save the confusion matrix (rows = GT, columns = prediction) as a PNG at ``path``.

    ``class_names`` may be the ``C`` foreground names (no_object is appended) or all ``C+1``.
    """
    # Figure + Agg canvas directly instead of pyplot: no global backend switch, no GUI, thread safe.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    cm = np.asarray(cm)
    names = _full_names(class_names, cm.shape[0])
    size = max(4.0, 0.8 * len(names) + 2.0)
    fig = Figure(figsize=(size, size))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    # Colour by row share so rare classes stay readable; the cells show raw counts.
    rows = cm.sum(1, keepdims=True)
    share = np.divide(cm, rows, out=np.zeros(cm.shape, dtype=float), where=rows > 0)
    im = ax.imshow(share, cmap="Blues", vmin=0.0, vmax=1.0)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="share of row")
    ax.set_xticks(range(len(names)), labels=names, rotation=45, ha="right")
    ax.set_yticks(range(len(names)), labels=names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("ground truth")
    ax.set_title(title)
    for i in range(cm.shape[0]):
        for j in range(cm.shape[1]):
            ax.text(j, i, str(int(cm[i, j])), ha="center", va="center",
                    color="white" if share[i, j] > 0.5 else "black")
    fig.tight_layout()
    fig.savefig(str(path), format="png", dpi=100)
