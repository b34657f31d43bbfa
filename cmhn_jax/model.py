"""The CMHN model: per-modality encoders, projection heads and the associative memory.

`e_m = normalize(Proj_m(Enc_m(x_m)))` for every modality present in a batch (DESIGN.md
section 4). The memory holds `N` multimodal patterns `(N, M, d)` (kept on the unit sphere:
they are normalised wherever they are used), the coupling `C` (diagonal modality weights and
optional cross-modal terms) and the inverse temperature `beta`. `CMHN.memory()` returns them as
the keyword arguments of `cmhn_jax.energy.energy` and `cmhn_jax.retrieval.retrieve`, so the
trainer, the losses and the evaluators all speak to the memory through the same pure functions.

The model config (`config.model`) picks every part by name:

  model.embed_dim          shared embedding size d
  model.modalities         e.g. ('image', 'text', 'audio'); M follows this order
  model.encoders.<mod>     {'name': a `cmhn_jax.models.ENCODERS` name, ...its keyword arguments}
  model.head               'linear' | 'mlp'
  model.memory             num_patterns, similarity, normalizer, beta, learn_beta, lam,
                           coupling (M diagonal weights), learn_coupling, learn_cross, init
  model.logit_scale        initial contrastive logit scale (CLIP: 1 / 0.07), learnable
  model.dtype              compute dtype of the encoders ('float32' | 'bfloat16')
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from cmhn_jax import energy as E
from cmhn_jax import models as encoders_lib

MODALITIES = ("image", "text", "audio")
SHORT = {"image": "img", "text": "txt", "audio": "aud"}
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def _encoder_inputs(modality: str, batch: dict[str, jax.Array]) -> tuple[jax.Array, ...]:
  if modality == "image":
    return (batch["image"],)
  return (batch[modality], batch[f"{modality}_mask"])


def _fill_from_data(modality: str, name: str, kwargs: dict[str, Any], info: Any) -> dict[str, Any]:
  """Sizes an encoder from the dataset (vocabulary, text length, mel bins) unless set."""
  if info is None or not name.endswith(("transformer", "conv", "cnn", "vit")):
    return kwargs
  if modality == "text":
    kwargs.setdefault("vocab_size", int(info.vocab_size))
    kwargs.setdefault("max_len", int(info.max_text_len))
  elif modality == "audio":
    kwargs.setdefault("num_mels", int(info.n_mels))
  elif modality == "image" and name == "image_vit":
    kwargs.setdefault("image_size", int(info.image_size))
  return kwargs


class Head(nnx.Module):
  """Projection head to the shared embedding space: Linear, or a 2-layer MLP."""

  def __init__(self, din: int, dout: int, *, kind: str, rngs: nnx.Rngs):
    if kind not in ("linear", "mlp"):
      raise ValueError(f"model.head={kind!r} is unknown; expected 'linear' or 'mlp'.")
    self.hidden = nnx.Linear(din, din, rngs=rngs) if kind == "mlp" else None
    self.out = nnx.Linear(din, dout, rngs=rngs)

  def __call__(self, x):
    if self.hidden is not None:
      x = nnx.gelu(self.hidden(x))
    return self.out(x)


class CMHN(nnx.Module):
  """Encoders + heads + memory. See the module docstring for the config."""

  def __init__(self, config: ml_collections.ConfigDict, info: Any = None, *, rngs: nnx.Rngs):
    cfg = config
    self.modalities = tuple(cfg.modalities)
    unknown = set(self.modalities) - set(MODALITIES)
    if unknown or not self.modalities:
      raise ValueError(f"model.modalities={self.modalities} must be a non-empty subset of {MODALITIES}.")
    if cfg.dtype not in DTYPES:
      raise ValueError(f"model.dtype={cfg.dtype!r} is unknown; expected one of {sorted(DTYPES)}.")
    d = int(cfg.embed_dim)
    encoders, heads = {}, {}
    for m in self.modalities:
      if m not in cfg.encoders:
        raise ValueError(f"model.encoders has no entry for modality {m!r}; it has {sorted(cfg.encoders)}.")
      spec = dict(cfg.encoders[m])
      name = spec.pop("name")
      spec = _fill_from_data(m, name, spec, info)
      enc = encoders_lib.build_encoder(name, rngs=rngs, dtype=DTYPES[cfg.dtype], **spec)
      encoders[m] = enc
      heads[m] = Head(int(enc.out_dim), d, kind=cfg.head, rngs=rngs)
    self.encoders = nnx.Dict(encoders)
    self.heads = nnx.Dict(heads)

    mem = cfg.memory
    nm = len(self.modalities)
    self.similarity = mem.similarity
    self.normalizer = mem.normalizer
    self.lam = float(mem.lam)
    patterns = jax.random.normal(rngs.params(), (int(mem.num_patterns), nm, d))
    self.patterns = nnx.Param(E._l2_normalize(patterns))
    diag = np.asarray(mem.coupling if mem.coupling is not None else [1.0] * nm, np.float32)
    if diag.shape != (nm,) or np.any(diag <= 0):
      raise ValueError(f"model.memory.coupling must hold {nm} positive weights; got {diag.tolist()}.")
    log_diag = jnp.log(jnp.asarray(diag, jnp.float32))
    self.log_coupling = nnx.Param(log_diag) if mem.learn_coupling else nnx.Variable(log_diag)
    cross = jnp.zeros((nm, nm), jnp.float32)
    self.cross = nnx.Param(cross) if mem.learn_cross else nnx.Variable(cross)
    log_beta = jnp.log(jnp.asarray(float(mem.beta), jnp.float32))
    self.log_beta = nnx.Param(log_beta) if mem.learn_beta else nnx.Variable(log_beta)
    self.log_logit_scale = nnx.Param(jnp.log(jnp.asarray(float(cfg.logit_scale), jnp.float32)))

  # --------------------------------------------------------------------------- embeddings

  def embed(self, batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
    """`{'img/emb': (B, d), 'txt/emb': ..., 'aud/emb': ...}`, unit norm, for each modality."""
    out = {}
    for m in self.modalities:
      if m not in batch:
        continue
      feats = self.encoders[m](*_encoder_inputs(m, batch))
      out[f"{SHORT[m]}/feat"] = feats
      out[f"{SHORT[m]}/emb"] = E._l2_normalize(self.heads[m](feats.astype(jnp.float32)))
    return out

  def __call__(self, batch):
    return self.embed(batch)

  # --------------------------------------------------------------------------- memory

  def coupling(self) -> jax.Array:
    """`C = diag(exp(log_w)) + cross` with a zero diagonal on the cross-modal part."""
    nm = len(self.modalities)
    off = self.cross[...] * (1.0 - jnp.eye(nm))
    return jnp.diag(jnp.exp(self.log_coupling[...])) + off

  def beta(self) -> jax.Array:
    return jnp.exp(self.log_beta[...])

  def logit_scale(self) -> jax.Array:
    """CLIP's clamp: the contrastive logit scale never exceeds 100."""
    return jnp.minimum(jnp.exp(self.log_logit_scale[...]), 100.0)

  def memory(self) -> dict[str, Any]:
    """Keyword arguments of `energy.energy` / `retrieval.retrieve` for this memory."""
    return dict(patterns=E._l2_normalize(self.patterns[...]), coupling=self.coupling(),
                similarity=self.similarity, normalizer=self.normalizer, beta=self.beta(),
                lam=self.lam)


def stack_embeddings(emb: dict[str, jax.Array], modalities, batch) -> tuple[jax.Array, jax.Array]:
  """The state `z` (B, M, d) and its mask (B, M) from per-modality embeddings and `has_*`."""
  zs, masks = [], []
  b = next(iter(emb.values())).shape[0]
  for m in modalities:
    key = f"{SHORT[m]}/emb"
    if key in emb:
      zs.append(emb[key])
      masks.append(batch.get(f"has_{m}", jnp.ones((b,), bool)).astype(bool))
    else:
      zs.append(jnp.zeros_like(next(iter(emb.values()))))
      masks.append(jnp.zeros((b,), bool))
  return jnp.stack(zs, 1), jnp.stack(masks, 1)


def kmeans(x: jax.Array, k: int, *, rng: jax.Array, iters: int = 20) -> jax.Array:
  """Spherical k-means of unit vectors `x` (n, f) into `k` unit centroids (k, f).

  Initialised with distinct random points (k-means++ is not worth its cost here); an empty
  cluster keeps its previous centroid.
  """
  n = x.shape[0]
  if n < k:
    raise ValueError(f"k-means needs at least k={k} points; got {n}. Use more init batches.")
  cent = x[jax.random.choice(rng, n, (k,), replace=False)]

  def step(cent, _):
    assign = jnp.argmax(x @ cent.T, axis=-1)
    onehot = jax.nn.one_hot(assign, k, dtype=x.dtype)
    sums = onehot.T @ x
    counts = onehot.sum(0)[:, None]
    new = jnp.where(counts > 0, E._l2_normalize(sums), cent)
    return new, None

  cent, _ = jax.lax.scan(step, cent, None, length=iters)
  return cent
