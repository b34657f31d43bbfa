"""Cross-modal retrieval: R@K and mAP for every directed modality pair.

For a pair `a -> b` the queries are the held-out examples that have modality `a` and the gallery
those that have `b` (modalities listed in `unique_per_group` are de-duplicated by group, so a COCO
image is one query, not five). Two rankers:

* `embedding`: cosine between the query's `a` embedding and the gallery's `b` embeddings (the
  contrastive baseline);
* `cmhn`: the query's `a` embedding is a cue for `retrieval.retrieve` over the learned memory; the
  completed `b` state is matched (cosine) against the gallery's `b` embeddings.

A gallery item is relevant when it shares the query's relevance key (`relevance='concept'` for
`shapes`, `'group'` -- the image -- for COCO). R@K: the fraction of queries with a relevant item in
the top K. mAP: the mean over queries of the average precision of the full ranking.
"""

from __future__ import annotations

import functools
import itertools
from typing import Any, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from cmhn_jax import data as data_lib
from cmhn_jax import energy as E
from cmhn_jax import model as model_lib
from cmhn_jax import retrieval

RELEVANCE = ("concept", "group", "index")


def _embed_fn(setup):
  """One jitted embedding function per model (cached on its setup), shared across datasets."""
  if "embed" in setup.cache:
    return setup.cache["embed"]
  graphdef = setup.graphdef

  @jax.jit
  def embed(params, rest, batch):
    model = nnx.merge(graphdef, params, rest)
    return {k: v for k, v in model.embed(batch).items() if k.endswith("/emb")}

  setup.cache["embed"] = embed
  return embed


@functools.lru_cache(maxsize=None)
def _complete_fn(method: str, max_steps: int, similarity: str, normalizer: str, lam: float):
  @jax.jit
  def complete(cue, cue_mask, patterns, coupling, beta):
    return retrieval.retrieve(cue, patterns, cue_mask=cue_mask, coupling=coupling, beta=beta,
                              similarity=similarity, normalizer=normalizer, lam=lam,
                              method=method, max_steps=max_steps).state

  return complete


def embed_split(state, setup, data_config, split: str, batch_size: int) -> dict[str, np.ndarray]:
  """Embeddings (unit norm) and labels of every example of `split`, gathered on the host."""
  pipe = data_lib.get_pipeline(data_config, split, train=False, global_batch_size=batch_size)
  embed = _embed_fn(setup)
  out: dict[str, list] = {}
  try:
    for local in pipe:
      batch = data_lib.to_global_batch(local, setup.mesh)
      emb = jax.device_get(embed(state["params"], state["rest"], batch))
      for k, v in itertools.chain(emb.items(), ((k, batch[k]) for k in batch
                                                 if k.startswith("has_") or k in ("group", "concept", "index", "valid"))):
        out.setdefault(k, []).append(np.asarray(jax.device_get(v)))
  finally:
    pipe.close()
  cat = {k: np.concatenate(v) for k, v in out.items()}
  keep = cat.pop("valid").astype(bool)
  return {k: v[keep] for k, v in cat.items()}


def ranking_metrics(sims: np.ndarray, relevant: np.ndarray, ks=(1, 5, 10), chunk: int = 1024) -> dict:
  """R@K and mAP from a (Q, G) similarity matrix and a (Q, G) bool relevance matrix."""
  hits = {k: 0.0 for k in ks}
  ap_sum, q = 0.0, sims.shape[0]
  for lo in range(0, q, chunk):
    s, r = sims[lo:lo + chunk], relevant[lo:lo + chunk]
    order = np.argsort(-s, axis=1, kind="stable")
    rel_sorted = np.take_along_axis(r, order, axis=1)
    for k in ks:
      hits[k] += float(np.sum(rel_sorted[:, :k].any(axis=1)))
    cum = np.cumsum(rel_sorted, axis=1)
    ranks = np.arange(1, s.shape[1] + 1)[None]
    n_rel = np.maximum(rel_sorted.sum(1), 1)
    ap_sum += float(np.sum(np.sum(rel_sorted * cum / ranks, axis=1) / n_rel))
  out = {f"R@{k}": hits[k] / q for k in ks}
  out["mAP"] = ap_sum / q
  return out


def _select(emb, modality, unique: bool, key: str):
  idx = np.flatnonzero(emb[f"has_{modality}"].astype(bool))
  if unique:
    _, first = np.unique(emb["group"][idx], return_index=True)
    idx = idx[np.sort(first)]
  return idx


class RetrievalEvaluator:
  """`run(state, setup)` yields `(name, value)` for every pair, ranker and metric."""

  def __init__(self, config, data_config):
    if config.relevance not in RELEVANCE:
      raise ValueError(f"relevance={config.relevance!r}; expected one of {RELEVANCE}.")
    self.config = config
    self.data_config = data_config

  def run(self, state, setup) -> Iterator[tuple[str, Any]]:
    c = self.config
    emb = embed_split(state, setup, self.data_config, c.split, int(c.batch_size))
    model = nnx.merge(setup.graphdef, state["params"], state["rest"])
    memory = jax.device_get(model.memory())
    modalities = model.modalities
    key = c.relevance
    labels = emb[key]
    complete = _complete_fn(c.cmhn_method, int(c.cmhn_steps), memory["similarity"],
                            c.get("cmhn_normalizer") or memory["normalizer"], float(memory["lam"]))
    unique = tuple(c.get("unique_per_group", ()))
    yield "num_examples", int(labels.shape[0])
    for a, b in itertools.permutations(modalities, 2):
      ea, eb = emb.get(f"{model_lib.SHORT[a]}/emb"), emb.get(f"{model_lib.SHORT[b]}/emb")
      if ea is None or eb is None:
        continue
      qi, gi = _select(emb, a, a in unique, key), _select(emb, b, b in unique, key)
      if len(qi) == 0 or len(gi) == 0:
        continue
      relevant = labels[qi][:, None] == labels[gi][None, :]
      pair = f"{a}->{b}"
      for name, value in ranking_metrics(ea[qi] @ eb[gi].T, relevant, tuple(c.ks)).items():
        yield f"embedding/{pair}/{name}", value
      m_a, m_b = modalities.index(a), modalities.index(b)
      completed = []
      for lo in range(0, len(qi), int(c.batch_size)):
        q = ea[qi[lo:lo + int(c.batch_size)]]
        cue = np.zeros((q.shape[0], len(modalities), q.shape[1]), np.float32)
        cue[:, m_a] = q
        mask = np.zeros((q.shape[0], len(modalities)), bool)
        mask[:, m_a] = True
        completed.append(np.asarray(
            complete(cue, mask, memory["patterns"], memory["coupling"], memory["beta"]))[:, m_b])
      comp = np.asarray(E._l2_normalize(jnp.asarray(np.concatenate(completed))))
      for name, value in ranking_metrics(comp @ eb[gi].T, relevant, tuple(c.ks)).items():
        yield f"cmhn/{pair}/{name}", value
      # How close the completion comes to the query's own `b` embedding, where it has one.
      own = emb[f"has_{b}"][qi].astype(bool)
      if own.any():
        yield f"cmhn/{pair}/completion_cosine", float(np.mean(np.sum(comp[own] * eb[qi][own], -1)))
