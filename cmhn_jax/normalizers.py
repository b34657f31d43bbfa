"""Normalizers and their convex conjugates (the `Phi` of DESIGN.md section 1).

For a regulariser `Omega` on the probability simplex, the normalizer is

    p*(x) = argmax_{p in simplex} <p, x> - Omega(p)

and its value `Phi(x) = <p*, x> - Omega(p*)` is the convex conjugate of `Omega`
restricted to the simplex. By Danskin's theorem `grad Phi = p*`, so an energy
written with `Phi` gives the attention as its gradient (Hopfield-Fenchel-Young
energies, Santos et al. 2024):

| name        | Omega(p)                         | Phi(x)                     | p*(x)                   |
|-------------|----------------------------------|----------------------------|-------------------------|
| `softmax`   | sum p log p                      | logsumexp(x)               | exp(x - Phi)            |
| `sparsemax` | (||p||^2 - 1) / 2                | <p, x> - (||p||^2 - 1) / 2 | [x - tau]_+             |
| `entmax15`  | (sum p^1.5 - 1) / 0.75 (Tsallis) | <p, x> + (4/3)(1 - sum p^1.5) | [x/2 - tau]_+^2      |

All functions act on the last axis, are shift-equivariant (`Phi(x + c) = Phi(x) + c`,
`p*(x + c) = p*(x)`) and are computed from `x - max(x)`, so they are stable for
scores of any size (`beta = 1e3` included). Entries equal to `-inf` (masked
patterns) get probability exactly zero; a row that is entirely `-inf` gets `Phi = -inf`
and an all-zero `p*` rather than NaN.

`Phi` carries a custom JVP whose tangent is `<p*(x), dx>`, so `jax.grad(Phi)` is exactly
the normalizer, and the normalizers carry their own Jacobians (for `sparsemax` and
`entmax15`: `diag(s) - s s^T / sum(s)` with `s = 1[p > 0]` resp. `s = sqrt(p)`,
Peters et al. 2019), so second derivatives (gradients through retrieval) are exact too.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp


def _safe_max(x: jax.Array) -> jax.Array:
  """Row max that is 0 (not -inf) for all -inf rows, so `x - max` stays finite."""
  m = jnp.max(x, axis=-1, keepdims=True)
  return jax.lax.stop_gradient(jnp.where(jnp.isfinite(m), m, 0.0))


def _sorted_threshold(x: jax.Array, power: int) -> jax.Array:
  """Exact threshold `tau` of sparsemax (power=1) or 1.5-entmax (power=2).

  Solves `sum_i [x_i - tau]_+^power = 1` by sorting (Martins & Astudillo 2016;
  Peters et al. 2019); `x` has had its max subtracted. Returns shape `x.shape[:-1] + (1,)`.
  """
  n = x.shape[-1]
  xs = -jnp.sort(-x, axis=-1)  # descending; -inf entries go last
  xs_finite = jnp.where(jnp.isfinite(xs), xs, 0.0)
  k = jnp.arange(1, n + 1, dtype=x.dtype)
  csum = jnp.cumsum(xs_finite, axis=-1)
  if power == 1:
    tau_k = (csum - 1.0) / k
  else:
    mean = csum / k
    mean_sq = jnp.cumsum(xs_finite**2, axis=-1) / k
    delta = (1.0 - k * (mean_sq - mean**2)) / k
    tau_k = mean - jnp.sqrt(jnp.maximum(delta, 0.0))
  in_support = (tau_k < xs) & jnp.isfinite(xs)  # support is a prefix of the sorted order
  support = jnp.maximum(jnp.sum(in_support, axis=-1, keepdims=True), 1)
  return jnp.take_along_axis(tau_k, support - 1, axis=-1)


# ----------------------------------------------------------------------------- softmax


def softmax(x: jax.Array) -> jax.Array:
  m = _safe_max(x)
  e = jnp.exp(x - m)
  return e / jnp.maximum(jnp.sum(e, axis=-1, keepdims=True), jnp.finfo(e.dtype).tiny)


@jax.custom_jvp
def logsumexp(x: jax.Array) -> jax.Array:
  m = _safe_max(x)
  return jnp.log(jnp.sum(jnp.exp(x - m), axis=-1)) + m[..., 0]


@logsumexp.defjvp
def _logsumexp_jvp(primals, tangents):
  (x,), (dx,) = primals, tangents
  p = softmax(x)
  return logsumexp(x), jnp.sum(p * jnp.where(p > 0, dx, 0.0), axis=-1)


# ----------------------------------------------------------------------------- sparsemax


@jax.custom_jvp
def sparsemax(x: jax.Array) -> jax.Array:
  """Euclidean projection of `x` onto the simplex (Martins & Astudillo 2016)."""
  x = x - _safe_max(x)
  tau = _sorted_threshold(x, power=1)
  return jnp.where(jnp.isfinite(x), jnp.maximum(x - tau, 0.0), 0.0)


@sparsemax.defjvp
def _sparsemax_jvp(primals, tangents):
  (x,), (dx,) = primals, tangents
  p = sparsemax(x)
  s = (p > 0).astype(p.dtype)
  dx = jnp.where(s > 0, dx, 0.0)
  ds = s * dx - s * jnp.sum(s * dx, -1, keepdims=True) / jnp.sum(s, -1, keepdims=True)
  return p, ds


@jax.custom_jvp
def sparsemax_phi(x: jax.Array) -> jax.Array:
  m = _safe_max(x)
  p = sparsemax(x)
  xc = jnp.where(p > 0, x - m, 0.0)
  phi = jnp.sum(p * xc, -1) - 0.5 * jnp.sum(p * p, -1) + 0.5 + m[..., 0]
  return jnp.where(jnp.any(jnp.isfinite(x), -1), phi, -jnp.inf)


@sparsemax_phi.defjvp
def _sparsemax_phi_jvp(primals, tangents):
  (x,), (dx,) = primals, tangents
  p = sparsemax(x)
  return sparsemax_phi(x), jnp.sum(p * jnp.where(p > 0, dx, 0.0), axis=-1)


# ----------------------------------------------------------------------------- 1.5-entmax


@jax.custom_jvp
def entmax15(x: jax.Array) -> jax.Array:
  """Exact 1.5-entmax: `p = [x/2 - tau]_+^2` with `sum p = 1` (Peters et al. 2019)."""
  x = (x - _safe_max(x)) / 2.0
  tau = _sorted_threshold(x, power=2)
  return jnp.where(jnp.isfinite(x), jnp.maximum(x - tau, 0.0) ** 2, 0.0)


@entmax15.defjvp
def _entmax15_jvp(primals, tangents):
  (x,), (dx,) = primals, tangents
  p = entmax15(x)
  s = jnp.sqrt(p)
  dx = jnp.where(p > 0, dx, 0.0)
  sdx = s * dx
  dp = sdx - s * jnp.sum(sdx, -1, keepdims=True) / jnp.maximum(jnp.sum(s, -1, keepdims=True), 1e-30)
  # d entmax_alpha / dx = diag(s) - s s^T / sum(s), s = p^(2 - alpha), for the
  # parametrisation p = [(alpha - 1) x - tau]_+^(1 / (alpha - 1)).
  return p, dp


@jax.custom_jvp
def entmax15_phi(x: jax.Array) -> jax.Array:
  m = _safe_max(x)
  p = entmax15(x)
  xc = jnp.where(p > 0, x - m, 0.0)
  phi = jnp.sum(p * xc, -1) + (4.0 / 3.0) * (1.0 - jnp.sum(p * jnp.sqrt(p), -1)) + m[..., 0]
  return jnp.where(jnp.any(jnp.isfinite(x), -1), phi, -jnp.inf)


@entmax15_phi.defjvp
def _entmax15_phi_jvp(primals, tangents):
  (x,), (dx,) = primals, tangents
  p = entmax15(x)
  return entmax15_phi(x), jnp.sum(p * jnp.where(p > 0, dx, 0.0), axis=-1)


# ----------------------------------------------------------------------------- registry


class Normalizer(NamedTuple):
  """A normalizer `p*` and its conjugate `Phi` (`jax.grad(Phi) == p*`)."""

  name: str
  phi: Callable[[jax.Array], jax.Array]
  probs: Callable[[jax.Array], jax.Array]
  # Width of the support above the max: p*_i > 0 implies x_i > max(x) - support_width.
  # (softmax: infinite; sparsemax: 1 since p_max <= 1; entmax15: 2.)
  support_width: float


NORMALIZERS = {
    "softmax": Normalizer("softmax", logsumexp, softmax, float("inf")),
    "sparsemax": Normalizer("sparsemax", sparsemax_phi, sparsemax, 1.0),
    "entmax15": Normalizer("entmax15", entmax15_phi, entmax15, 2.0),
}


def get(name: str) -> Normalizer:
  """Returns the named normalizer; raises ValueError listing the known names."""
  try:
    return NORMALIZERS[name]
  except KeyError:
    raise ValueError(
        f"normalizer={name!r} is unknown; expected one of {sorted(NORMALIZERS)}."
    ) from None
