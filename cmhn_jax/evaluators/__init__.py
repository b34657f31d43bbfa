"""Evaluators, chosen by name from `config.evaluators` (`{name: evaluator config}`).

Each evaluator is a small class built from its config and the data config, whose
`run(state, setup)` yields `(name, value)`. `evaluate_and_report` runs them all and writes
`WORKDIR/report/{metrics.json, report.md, *.png}`.
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
from absl import logging

from cmhn_jax.evaluators.retrieval import RetrievalEvaluator

EVALUATORS = {"retrieval": RetrievalEvaluator}


def build(name: str, config, data_config):
  if name not in EVALUATORS:
    raise ValueError(f"config.evaluators.{name}: unknown evaluator; known: {sorted(EVALUATORS)}.")
  return EVALUATORS[name](config, data_config)


def _nest(flat: dict[str, Any]) -> dict:
  out: dict = {}
  for key, value in flat.items():
    node = out
    *parents, leaf = key.split("/")
    for p in parents:
      node = node.setdefault(p, {})
    node[leaf] = value
  return out


def evaluate_and_report(config, workdir: str, state, setup) -> dict:
  """Runs every configured evaluator and writes the report (process 0)."""
  results: dict[str, Any] = {"train": dict(setup.train_stats), "step": int(jax.device_get(state["step"]))}
  for name, ev_config in config.evaluators.items():
    evaluator = build(name, ev_config, config.data)
    flat = dict(evaluator.run(state, setup))
    results[name] = _nest(flat)
    logging.info("Evaluator %s: %d values.", name, len(flat))
  if jax.process_index() == 0:
    from cmhn_jax import report  # pylint: disable=g-import-not-at-top
    report_dir = os.path.join(workdir, "report")
    os.makedirs(report_dir, exist_ok=True)
    with open(os.path.join(report_dir, "metrics.json"), "w") as f:
      json.dump(results, f, indent=2, sort_keys=True)
    report.write_report(report_dir, results, setup.history)
  return results
