"""Cross-modal Hopfield energies as pure functions (DESIGN.md section 1).

Shapes (a leading batch axis `B`; `vmap` adds more):

| argument   | shape       | meaning                                                       |
|------------|-------------|---------------------------------------------------------------|
| `z`        | `(B, M, d)` | state: one `d`-dim embedding per modality                     |
| `patterns` | `(N, M, d)` | N stored multimodal tuples                                    |
| `z_mask`   | `(B, M)`    | bool, which state modalities are available (default: all)     |
| `p_mask`   | `(N, M)`    | bool, which modalities each pattern has (default: all)        |
| `coupling` | `(M, M)`    | `C`; `diag(w)` weights modalities, off-diagonals couple them  |

Scores (eq. 1):   `s_mu(z) = sum_{m,m'} a_m q_{mu,m'} C_{m,m'} sim(z_m, p_{mu,m'})`

Energy (eq. 2):   `E(z) = -(1/beta) Phi(beta s(z)) + (lam/2) sum_m a_m ||z_m||^2`

With `sim` in {`dot`, `cosine`} the score is one GEMM over the flattened `M*d` axis:
`s = couple(z) . P_eff^T` with the coupled state `z~_{m'} = sum_m a_m C_{m,m'} z^_m`
and the effective patterns `P_eff_{mu,m'} = q_{mu,m'} p^_{mu,m'}` (`^` = unit norm under
`cosine`, identity under `dot`). Masked-out modalities (of the state or of a pattern)
are multiplied by exact zeros, so their values change no score, energy or gradient.

`attention(...) = Phi'(beta s)` = the normalizer of `beta s`, which equals
`-jax.grad` of the first energy term with respect to the scores.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from cmhn_jax import normalizers

SIMILARITIES = ("dot", "cosine")
_EPS = 1e-12


def _l2_normalize(x: jax.Array, axis: int = -1) -> jax.Array:
  """`x / ||x||`, and 0 (not NaN) for a zero vector; differentiable away from 0."""
  sq = jnp.sum(x * x, axis=axis, keepdims=True)
  safe = jnp.where(sq > _EPS, sq, 1.0)
  return jnp.where(sq > _EPS, x * jax.lax.rsqrt(safe), 0.0)


def check_inputs(
    z: Any,
    patterns: Any,
    *,
    z_mask: Any = None,
    p_mask: Any = None,
    coupling: Any = None,
    similarity: str = "cosine",
    normalizer: str | None = "softmax",
    beta: Any = 1.0,
    z_name: str = "z",
    z_mask_name: str = "z_mask",
) -> tuple[int, int, int, int]:
  """Validates shapes and options (at trace time); returns `(B, N, M, d)`."""
  z_shape, p_shape = jnp.shape(z), jnp.shape(patterns)
  if len(p_shape) != 3:
    raise ValueError(f"patterns must have shape (N, M, d); got shape {p_shape}.")
  n, m, d = p_shape
  if len(z_shape) != 3 or z_shape[1:] != (m, d):
    raise ValueError(
        f"{z_name} must have shape (B, M, d) = (B, {m}, {d}) to match patterns {p_shape};"
        f" got shape {z_shape}."
    )
  b = z_shape[0]
  for name, mask, want in ((z_mask_name, z_mask, (b, m)), ("p_mask", p_mask, (n, m))):
    if mask is not None and jnp.shape(mask) != want:
      raise ValueError(f"{name} must have shape {want}; got shape {jnp.shape(mask)}.")
  if coupling is not None and jnp.shape(coupling) != (m, m):
    raise ValueError(f"coupling must have shape (M, M) = ({m}, {m}); got {jnp.shape(coupling)}.")
  if similarity not in SIMILARITIES:
    raise ValueError(f"similarity={similarity!r} is unknown; expected one of {SIMILARITIES}.")
  if normalizer is not None:
    normalizers.get(normalizer)
  if not isinstance(beta, jax.core.Tracer) and jnp.ndim(beta) == 0 and float(beta) <= 0:
    raise ValueError(f"beta must be > 0 (an inverse temperature); got {float(beta)}.")
  return b, n, m, d


def _mask(mask: Any, shape: tuple[int, int], dtype) -> jax.Array:
  if mask is None:
    return jnp.ones(shape, dtype)
  return jnp.asarray(mask).astype(dtype)


def effective_patterns(patterns: jax.Array, p_mask: Any = None, *, similarity: str = "cosine"):
  """`P_eff = q * p^` flattened to `(N, M*d)`: the right-hand side of every score GEMM."""
  n, m, d = patterns.shape
  p_hat = _l2_normalize(patterns) if similarity == "cosine" else patterns
  p_eff = p_hat * _mask(p_mask, (n, m), patterns.dtype)[..., None]
  return p_eff.reshape(n, m * d)


def couple(z: jax.Array, *, z_mask: Any = None, coupling: Any = None, similarity: str = "cosine"):
  """The coupled state `z~_{m'} = sum_m a_m C_{m,m'} z^_m`, flattened to `(B, M*d)`."""
  b, m, d = z.shape
  z_hat = _l2_normalize(z) if similarity == "cosine" else z
  a = _mask(z_mask, (b, m), z.dtype)
  if coupling is None:
    zt = z_hat * a[..., None]
  else:
    zt = jnp.einsum("bm,mk,bmd->bkd", a, jnp.asarray(coupling, z.dtype), z_hat)
  return zt.reshape(b, m * d)


def scores(
    z: jax.Array,
    patterns: jax.Array,
    *,
    z_mask: Any = None,
    p_mask: Any = None,
    coupling: Any = None,
    similarity: str = "cosine",
) -> jax.Array:
  """Cross-modal scores `s(z)` of eq. 1, shape `(B, N)`: one GEMM."""
  check_inputs(z, patterns, z_mask=z_mask, p_mask=p_mask, coupling=coupling,
               similarity=similarity, normalizer=None)
  zt = couple(z, z_mask=z_mask, coupling=coupling, similarity=similarity)
  return zt @ effective_patterns(patterns, p_mask, similarity=similarity).T


def regularizer(z: jax.Array, *, z_mask: Any = None, lam: Any = 1.0) -> jax.Array:
  """`(lam / 2) sum_m a_m ||z_m||^2`, shape `(B,)`."""
  a = _mask(z_mask, z.shape[:2], z.dtype)
  return 0.5 * lam * jnp.sum(a * jnp.sum(z * z, axis=-1), axis=-1)


def energy(
    z: jax.Array,
    patterns: jax.Array,
    *,
    z_mask: Any = None,
    p_mask: Any = None,
    coupling: Any = None,
    similarity: str = "cosine",
    normalizer: str = "softmax",
    beta: Any = 1.0,
    lam: Any = 1.0,
) -> jax.Array:
  """The CMHN energy of eq. 2, shape `(B,)`.

  `E(z) = -(1/beta) Phi(beta s(z)) + (lam/2) sum_m a_m ||z_m||^2`, with `Phi` the
  conjugate of the normalizer (`logsumexp` for softmax; see `cmhn_jax.normalizers`).
  """
  check_inputs(z, patterns, z_mask=z_mask, p_mask=p_mask, coupling=coupling,
               similarity=similarity, normalizer=normalizer, beta=beta)
  s = scores(z, patterns, z_mask=z_mask, p_mask=p_mask, coupling=coupling, similarity=similarity)
  phi = normalizers.get(normalizer).phi
  return -phi(beta * s) / beta + regularizer(z, z_mask=z_mask, lam=lam)


def attention(
    z: jax.Array,
    patterns: jax.Array,
    *,
    z_mask: Any = None,
    p_mask: Any = None,
    coupling: Any = None,
    similarity: str = "cosine",
    normalizer: str = "softmax",
    beta: Any = 1.0,
) -> jax.Array:
  """The attention over patterns `alpha = normalizer(beta s(z))`, shape `(B, N)`.

  Equals `jax.grad` of `(1/beta) Phi(beta s)` with respect to `s`.
  """
  check_inputs(z, patterns, z_mask=z_mask, p_mask=p_mask, coupling=coupling,
               similarity=similarity, normalizer=normalizer, beta=beta)
  s = scores(z, patterns, z_mask=z_mask, p_mask=p_mask, coupling=coupling, similarity=similarity)
  return normalizers.get(normalizer).probs(beta * s)
