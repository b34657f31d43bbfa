"""Cross-modal retrieval: R@K and mAP for every directed modality pair.

For a pair `a -> b` the queries are the held-out examples that have modality `a` and the gallery
those that have `b` (modalities listed in `unique_per_group` are de-duplicated by group, so a COCO
image is one query, not five). Two rankers:

* `embedding`: cosine between the query's `a` embedding and the gallery's `b` embeddings (the
  contrastive baseline);
* `cmhn`: the query's `a` embedding is a cue for `retrieval.retrieve` over the learned memory
  (the model's prototypes); the completed `b` state is matched (cosine) against the gallery's
  `b` embeddings;
* `cmhn_stored` (with `'stored'` in `cmhn_memories`): the same, over stored items -- the embedded
  tuples of `stored_split` (the training set by default, never the evaluated split), so a cue
  recalls the other modalities of the training tuples it resembles (DESIGN.md section 3).

Inverse temperatures: `cmhn_beta` overrides the learned memory's own `beta`; `stored_beta` sets
the stored-item memory's (default: the learned memory's, after `cmhn_beta`). They are separate
because the memories differ: a few prototypes want a soft read-out that a memory of thousands of
items, each one an exact embedding, would blur across its nearest dozens of neighbours.

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
  def complete(cue, cue_mask, patterns, p_mask, coupling, beta):
    return retrieval.retrieve(cue, patterns, cue_mask=cue_mask, p_mask=p_mask, coupling=coupling, beta=beta,
                              similarity=similarity, normalizer=normalizer, lam=lam,
                              method=method, max_steps=max_steps).state

  return complete


def embed_split(state, setup, data_config, split: str, batch_size: int,
                max_examples: int | None = None) -> dict[str, np.ndarray]:
  """Embeddings (unit norm) and labels of the examples of `split` (the first `max_examples`)."""
  pipe = data_lib.get_pipeline(data_config, split, train=False, global_batch_size=batch_size)
  embed = _embed_fn(setup)
  out: dict[str, list] = {}
  seen = 0
  try:
    for local in pipe:
      if max_examples is not None and seen >= max_examples:
        break
      seen += len(local["valid"])
      batch = data_lib.to_global_batch(local, setup.mesh)
      emb = jax.device_get(embed(state["params"], state["rest"], batch))
      for k, v in itertools.chain(emb.items(), ((k, batch[k]) for k in batch
                                                 if k.startswith("has_") or k in ("group", "concept", "index", "valid"))):
        out.setdefault(k, []).append(np.asarray(jax.device_get(v)))
  finally:
    pipe.close()
  cat = {k: np.concatenate(v) for k, v in out.items()}
  keep = cat.pop("valid").astype(bool)
  out = {k: v[keep] for k, v in cat.items()}
  return out if max_examples is None else {k: v[:max_examples] for k, v in out.items()}


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


def _select(emb, modality, unique: bool):
  """Rows that have `modality`; with `unique`, only the first row of each group."""
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

  def _memories(self, state, setup, model):
    """`{ranker name: memory kwargs}` for the memories named in `cmhn_memories`."""
    c = self.config
    learned = jax.device_get(model.memory())
    if c.get("cmhn_beta"):
      learned["beta"] = float(c.cmhn_beta)
    out = {}
    for name in tuple(c.get("cmhn_memories", ("learned",))):
      if name == "learned":
        out["cmhn"] = learned
      elif name == "stored":
        if c.stored_split == c.split:
          raise ValueError("stored_split must differ from the evaluated split.")
        stored = embed_split(state, setup, self.data_config, c.stored_split, int(c.batch_size),
                             max_examples=int(c.stored_examples))
        z, mask = [], []
        for m in model.modalities:
          z.append(stored[f"{model_lib.SHORT[m]}/emb"])
          mask.append(stored[f"has_{m}"].astype(bool))
        out["cmhn_stored"] = dict(learned, patterns=np.stack(z, 1), p_mask=np.stack(mask, 1))
        if c.get("stored_beta"):
          out["cmhn_stored"]["beta"] = float(c.stored_beta)
      else:
        raise ValueError(f"cmhn_memories: {name!r} is unknown; expected 'learned' or 'stored'.")
    return out

  def run(self, state, setup) -> Iterator[tuple[str, Any]]:
    c = self.config
    emb = embed_split(state, setup, self.data_config, c.split, int(c.batch_size))
    model = nnx.merge(setup.graphdef, state["params"], state["rest"])
    memories = self._memories(state, setup, model)
    some = next(iter(memories.values()))
    modalities = model.modalities
    key = c.relevance
    labels = emb[key]
    complete = _complete_fn(c.cmhn_method, int(c.cmhn_steps), some["similarity"],
                            c.get("cmhn_normalizer") or some["normalizer"], float(some["lam"]))
    unique = tuple(c.get("unique_per_group", ()))
    yield "num_examples", int(labels.shape[0])
    yield "relevance", key
    for a, b in itertools.permutations(modalities, 2):
      ea, eb = emb.get(f"{model_lib.SHORT[a]}/emb"), emb.get(f"{model_lib.SHORT[b]}/emb")
      if ea is None or eb is None:
        continue
      qi, gi = _select(emb, a, a in unique), _select(emb, b, b in unique)
      if len(qi) == 0 or len(gi) == 0:
        continue
      relevant = labels[qi][:, None] == labels[gi][None, :]
      pair = f"{a}->{b}"
      for name, value in ranking_metrics(ea[qi] @ eb[gi].T, relevant, tuple(c.ks)).items():
        yield f"embedding/{pair}/{name}", value
      m_a, m_b = modalities.index(a), modalities.index(b)
      for ranker, memory in memories.items():
        comp = self._complete(complete, ea[qi], m_a, m_b, len(modalities), memory)
        for name, value in ranking_metrics(comp @ eb[gi].T, relevant, tuple(c.ks)).items():
          yield f"{ranker}/{pair}/{name}", value
        # How close the completion comes to the query's own `b` embedding, where it has one.
        own = emb[f"has_{b}"][qi].astype(bool)
        if own.any():
          yield (f"{ranker}/{pair}/completion_cosine",
                 float(np.mean(np.sum(comp[own] * eb[qi][own], -1))))

  def _complete(self, complete, queries, m_a, m_b, nm, memory) -> np.ndarray:
    """Completes modality `m_b` from cues that hold only modality `m_a`; unit-norm (Q, d)."""
    bs = int(self.config.batch_size)
    out = []
    for lo in range(0, len(queries), bs):
      q = queries[lo:lo + bs]
      cue = np.zeros((q.shape[0], nm, q.shape[1]), np.float32)
      cue[:, m_a] = q
      mask = np.zeros((q.shape[0], nm), bool)
      mask[:, m_a] = True
      p_mask = memory.get("p_mask")
      if p_mask is None:
        p_mask = np.ones(np.shape(memory["patterns"])[:2], bool)
      state = complete(cue, mask, memory["patterns"], p_mask, memory["coupling"], memory["beta"])
      out.append(np.asarray(state)[:, m_b])
    return np.asarray(E._l2_normalize(jnp.asarray(np.concatenate(out))))
