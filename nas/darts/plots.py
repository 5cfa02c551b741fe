"""Pictures of a DARTS search: α of every edge over the epochs, and the discovered cells.

Drawn with matplotlib only (no graphviz), on the Agg backend so no display is needed.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from matplotlib.patches import FancyArrowPatch


def plot_alpha_history(
    history: Sequence[Sequence[Sequence[float]]],
    edge_labels: Sequence[str],
    candidate_names: Sequence[Sequence[str]],
    path: Path,
    title: str = "DARTS: softmax(α) per edge over epochs",
) -> Path:
    """One small panel per edge: each candidate's mixture weight after every epoch.

    ``history[e][k][o]`` is op ``o`` of edge ``k`` after epoch ``e`` (epoch 0: before search).
    """
    n_edges = len(edge_labels)
    cols = min(7, max(1, n_edges))
    rows = max(1, math.ceil(n_edges / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(2.6 * cols, 2.1 * rows + 0.8), squeeze=False, sharex=True)
    epochs = list(range(len(history)))
    handles, labels = {}, []
    for k in range(rows * cols):
        ax = axes[k // cols][k % cols]
        if k >= n_edges:
            ax.axis("off")
            continue
        for o, name in enumerate(candidate_names[k]):
            (line,) = ax.plot(epochs, [history[e][k][o] for e in epochs], label=name, lw=1.2)
            if name not in handles:
                handles[name] = line
                labels.append(name)
        ax.set_title(edge_labels[k], fontsize=7)
        ax.tick_params(labelsize=6)
    fig.legend([handles[n] for n in labels], labels, loc="lower center", ncol=min(8, len(labels)), fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.supxlabel("epoch", fontsize=7, y=0.06)
    fig.tight_layout(rect=(0, 0.08, 1, 0.95))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_cell(pairs: Sequence[tuple[str, int]], concat: Sequence[int], path: Path, title: str) -> Path:
    """Draw one cell of a genotype: inputs c_{k-2}, c_{k-1}, intermediate nodes, output c_k."""
    steps = len(pairs) // 2
    fig, ax = plt.subplots(figsize=(2.2 * (steps + 2), 4.2))
    pos: dict[int, tuple[float, float]] = {0: (0.0, 1.4), 1: (0.0, -1.4)}
    for k in range(steps):
        pos[k + 2] = (1.6 * (k + 1), 1.0 if k % 2 == 0 else -1.0)
    out_pos = (1.6 * (steps + 1), 0.0)
    names = {0: "c_{k-2}", 1: "c_{k-1}", **{k + 2: str(k) for k in range(steps)}}
    colors = {0: "#9ecae1", 1: "#9ecae1", **{k + 2: "#fdd49e" for k in range(steps)}}
    for state, (x, y) in pos.items():
        ax.text(
            x,
            y,
            names[state],
            ha="center",
            va="center",
            fontsize=9,
            bbox={"boxstyle": "round", "fc": colors[state], "ec": "black"},
            zorder=3,
        )
    ax.text(
        *out_pos,
        "c_{k}",
        ha="center",
        va="center",
        fontsize=9,
        bbox={"boxstyle": "round", "fc": "#c7e9c0", "ec": "black"},
        zorder=3,
    )
    palette = plt.get_cmap("tab10")
    op_names = sorted({op for op, _ in pairs})
    color_of = {op: palette(i % 10) for i, op in enumerate(op_names)}
    for index, (op, source) in enumerate(pairs):
        target = index // 2 + 2
        bend = 0.2 if index % 2 else -0.2
        arrow = FancyArrowPatch(
            pos[source],
            pos[target],
            arrowstyle="-|>",
            mutation_scale=12,
            lw=2.0,
            color=color_of[op],
            connectionstyle=f"arc3,rad={bend}",
            shrinkA=14,
            shrinkB=14,
            zorder=2,
        )
        ax.add_patch(arrow)
    # Edges are coloured by op (a legend, not labels on crossing arrows, keeps it readable).
    for op in op_names:
        ax.plot([], [], color=color_of[op], lw=2.0, label=op)
    ax.legend(
        loc="upper center", bbox_to_anchor=(0.5, 0.02), ncol=min(4, len(op_names)), fontsize=8, frameon=False
    )
    for state in concat:
        arrow = FancyArrowPatch(
            pos[state],
            out_pos,
            arrowstyle="-|>",
            mutation_scale=8,
            lw=0.7,
            color="gray",
            linestyle="--",
            shrinkA=14,
            shrinkB=14,
            zorder=1,
        )
        ax.add_patch(arrow)
    ax.set_xlim(-0.8, out_pos[0] + 0.8)
    ax.set_ylim(-2.0, 2.0)
    ax.axis("off")
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
