"""Qualitative results: query image and text, the top-k retrieved, hits marked."""

from __future__ import annotations

import textwrap
from typing import Sequence

from matplotlib import figure
from matplotlib.backends import backend_agg
import numpy as np


def save_retrievals(
    path: str,
    split,
    queries: Sequence,
    neighbours: np.ndarray,
    *,
    top_k: int = 5,
    title: str = "",
) -> None:
  """Writes a PNG grid: one row per query (query image + text, its target
  image if known, then the top-k gallery images; hits framed green, misses red).

  Args:
    path: output PNG path.
    split: the `data.Split` the images come from.
    queries: the queries shown (one row each).
    neighbours: (len(queries), >= top_k) retrieved image indices in rank order.
    top_k: retrieved images per row.
    title: figure title.
  """
  rows, cols = len(queries), top_k + 2
  # A Figure with its own Agg canvas: no pyplot, so no global backend or
  # figure registry (safe in notebooks and threads).
  fig = figure.Figure(figsize=(1.9 * cols, 2.2 * rows))
  backend_agg.FigureCanvasAgg(fig)
  axes = fig.subplots(rows, cols, squeeze=False)
  for r, query in enumerate(queries):
    ax = axes[r][0]
    ax.imshow(split.image(query.source_index))
    ax.set_title("query", fontsize=8)
    ax.set_xlabel("\n".join(textwrap.wrap(query.text, 24)), fontsize=7)
    ax = axes[r][1]
    if query.target_index >= 0:
      ax.imshow(split.image(query.target_index))
    ax.set_title("target", fontsize=8)
    ax.set_xlabel(
        "\n".join(textwrap.wrap(query.target_caption, 24)), fontsize=6
    )
    for c in range(top_k):
      ax = axes[r][c + 2]
      index = int(neighbours[r, c])
      hit = split.captions[index] == query.target_caption
      ax.imshow(split.image(index))
      ax.set_title(
          f"#{c + 1} {'hit' if hit else 'miss'}",
          fontsize=8,
          color="green" if hit else "red",
      )
      for spine in ax.spines.values():
        spine.set_edgecolor("green" if hit else "red")
        spine.set_linewidth(3)
  for ax in axes.flat:
    ax.set_xticks([])
    ax.set_yticks([])
  fig.tight_layout(rect=(0, 0, 1, 0.97 if title else 1))
  if title:
    fig.suptitle(title, fontsize=10)
  fig.savefig(path, dpi=80)
