"""The run's report: `report.md` with the retrieval tables and the training figures, and plots."""

from __future__ import annotations

import os
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top,wrong-import-position


def _retrieval_rows(results: dict) -> list[tuple[str, str, dict]]:
  rows = []
  for ranker, pairs in results.get("retrieval", {}).items():
    if isinstance(pairs, dict):
      rows += [(ranker, pair, metrics) for pair, metrics in sorted(pairs.items())]
  return rows


def write_report(report_dir: str, results: dict, history: list[dict[str, Any]]) -> None:
  lines = ["# CMHN run report", ""]
  train = results.get("train", {})
  if train:
    lines += ["## Training", ""]
    for k in ("steps_timed", "sec_per_step", "examples_per_sec", "model_flops_per_step",
              "gemm_flops_per_sec", "mfu", "stopped_early"):
      if k in train and train[k] is not None:
        v = train[k]
        lines.append(f"- {k}: {v:.4g}" if isinstance(v, float) else f"- {k}: {v}")
    lines.append("")
  rows = _retrieval_rows(results)
  if rows:
    ks = [k for k in rows[0][2] if k.startswith("R@")] + ["mAP"]
    lines += ["## Cross-modal retrieval (held-out split)", "",
              f"relevance: {results.get('retrieval', {}).get('relevance', 'see config')}; "
              f"examples: {results.get('retrieval', {}).get('num_examples')}", "",
              "| ranker | pair | " + " | ".join(ks) + " |", "|---|---|" + "---|" * len(ks)]
    for ranker, pair, m in rows:
      lines.append(f"| {ranker} | {pair} | " + " | ".join(f"{m.get(k, float('nan')):.3f}" for k in ks) + " |")
    lines.append("")
    _plot_recall(report_dir, rows)
    lines += ["![R@1 per pair](recall_at_1.png)", ""]
  if history:
    _plot_history(report_dir, history)
    lines += ["![training curves](training.png)", ""]
  with open(os.path.join(report_dir, "report.md"), "w") as f:
    f.write("\n".join(lines))


def _plot_recall(report_dir, rows) -> None:
  pairs = sorted({p for _, p, _ in rows})
  fig, ax = plt.subplots(figsize=(max(6, 1.1 * len(pairs)), 3.5))
  rankers = list(dict.fromkeys(r for r, _, _ in rows))
  width = 0.8 / len(rankers)
  for i, ranker in enumerate(rankers):
    vals = {p: m.get("R@1", 0.0) for r, p, m in rows if r == ranker}
    ax.bar([j + (i - (len(rankers) - 1) / 2) * width for j in range(len(pairs))], [vals.get(p, 0) for p in pairs],
           width, label=ranker)
  ax.set_xticks(range(len(pairs)), pairs, rotation=30, ha="right")
  ax.set_ylim(0, 1.0)
  ax.set_ylabel("R@1")
  ax.legend()
  fig.tight_layout()
  fig.savefig(os.path.join(report_dir, "recall_at_1.png"), dpi=100)
  plt.close(fig)


def _plot_history(report_dir, history) -> None:
  steps = [h["step"] for h in history]
  keys = sorted({k for h in history for k in h if k == "loss" or k.startswith("loss/")})
  fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.5))
  for k in keys:
    ax1.plot(steps, [h.get(k, float("nan")) for h in history], label=k)
  ax1.set_xlabel("step")
  ax1.set_title("losses")
  ax1.legend(fontsize=7)
  ax2.plot(steps, [h.get("examples_per_sec", float("nan")) for h in history])
  ax2.set_xlabel("step")
  ax2.set_title("examples/s")
  fig.tight_layout()
  fig.savefig(os.path.join(report_dir, "training.png"), dpi=100)
  plt.close(fig)
