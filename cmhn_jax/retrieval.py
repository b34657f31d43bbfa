"""Retrieval dynamics: descend the CMHN energy from a partial cue (DESIGN.md section 2).

`retrieve(cue, patterns, cue_mask=...)` runs one of two dynamics on
`E(z) = -(1/beta) Phi(beta s(z)) + (lam/2) sum_m a_m ||z_m||^2`:

* `method='gradient'`: `z <- z - eta * grad E(z)` with `grad E` from `jax.grad` of the energy.
  Under `dot` the energy is a convex quadratic plus a concave function of `z`; majorising the
  concave part by its tangent shows the step never raises the energy for `0 < eta <= 2 / lam`
  (default `eta = 1 / lam`). Under `cosine` the state lives on the unit sphere per modality: the
  step is projected gradient descent, `z_m <- normalize(z_m - eta * (I - z_m z_m^T) grad_m E)`,
  which never raises the energy for `0 < eta <= 2 / max_m sum_m' |C_{m,m'}|` (default: half that
  bound). Both bounds hold for every normalizer, since every `Phi` is convex.
* `method='fixed_point'`: the concave-convex (majorise-minimise) step. Under `dot`,
  `z_m <- g_m(z) / lam` with the read-out `g_m(z) = sum_mu alpha_mu sum_m' q_{mu,m'} C_{m,m'}
  p_{mu,m'}` -- the proposal's `z_m <- sum_mu alpha_mu p_{mu,m}` at `lam = 1`, `C = I` -- and it is
  exactly the gradient step with `eta = 1 / lam`. Under `cosine`, `z_m <- normalize(g_m(z))`.
  The read-out is itself `-jax.grad` of the energy with respect to the coupled state, so both
  methods share one score GEMM and one read-out GEMM per step.

The first step fills the modalities missing from the cue with their read-out (the fixed-point
value, for both methods); from then on every modality counts as available, so the energy trace is
comparable from index 1 on. `clamp_cue=True` keeps the cue modalities at the cue. A cue with no
available modality scores 0 against every pattern, so the first step fills every modality with the
uniform (softmax) or uniform-support average of the patterns: a finite, documented result.

Each example stops on its own when `||z_{t+1} - z_t|| < tol` (it is then frozen), or after
`max_steps` updates, inside `lax.while_loop`. `differentiable=True` runs exactly `max_steps`
iterations with `lax.scan` instead, so reverse-mode `jax.grad` can flow through the dynamics.

Large memories: `chunk_size=K` streams the patterns `K` at a time, so no `(B, N)` matrix is ever
an intermediate. Under `softmax` it is the flash-attention recurrence (online logsumexp with a
rescaled read-out accumulator), with a custom JVP whose reverse pass reuses the forward read-out:
still one score GEMM and one read-out GEMM per step. The sparse normalizers need the full sorted
score vector for their threshold, which no single stream gives exactly; chunked, they keep the top
`sparse_k` scores of a stream (per-chunk `lax.top_k` plus a merge) and normalise over those. Their
support lies within `support_width` (1 for sparsemax, 2 for 1.5-entmax) of the max score, so the
result is exact whenever fewer than `sparse_k` scaled scores lie that close to the max; the
`exact` field says per example whether that held. Memory: `B * sparse_k * M * d` floats for the
gathered candidates. With `chunk_size` set the dense `attention` output itself is `(B, N)`: pass
`top_k` to get only the `top_k` largest weights and their pattern indices instead.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from cmhn_jax import energy as E
from cmhn_jax import normalizers

METHODS = ("gradient", "fixed_point")


class Retrieval(NamedTuple):
  """The outcome of `retrieve` (a pytree).

  state:       (B, M, d) final state; every modality filled.
  attention:   (B, N) attention over the patterns at the final state (a ranking of the memory),
               or the attention that produced the final state when `final_pass=False`;
               None when `top_k` is given.
  energies:    (max_steps + 1, B) energy of z_0 .. z_T (entries past an example's last step repeat
               its final energy); (max_steps, B) of z_0 .. z_{T-1} when `final_pass=False`.
  steps:       (B,) int32 updates applied to each example.
  converged:   (B,) bool, whether `||dz|| < tol` was reached.
  top_indices: (B, top_k) int32 pattern indices by decreasing attention, or None.
  top_weights: (B, top_k) their attention weights, or None.
  exact:       (B,) bool; False only for a chunked sparse normalizer whose support may exceed
               `sparse_k` (see the module docstring).
  """

  state: jax.Array
  attention: jax.Array | None
  energies: jax.Array
  steps: jax.Array
  converged: jax.Array
  top_indices: jax.Array | None = None
  top_weights: jax.Array | None = None
  exact: jax.Array | None = None


# ----------------------------------------------------------------------------- streaming


def _num_chunks(n: int, k: int) -> int:
  return -(-n // k)


def _chunk(patterns, p_mask, c, k, similarity):
  """Chunk `c` of `k` effective patterns, without padding (the last chunk is shifted back
  to end at N, and rows an earlier chunk already covered are marked invalid)."""
  n = patterns.shape[0]
  start = jnp.minimum(c * k, n - k)
  p = jax.lax.dynamic_slice_in_dim(patterns, start, k, 0)
  q = jax.lax.dynamic_slice_in_dim(p_mask, start, k, 0)
  idx = start + jnp.arange(k)
  return E.effective_patterns(p, q, similarity=similarity), idx >= c * k, idx, start


def _online_softmax_step(m, s):
  """One chunk of the online logsumexp: the new running max, the rescale of the old partial
  sums (`exp(m_old - m_new)`, 0 while nothing was seen) and the chunk's `exp(s - m_new)`."""
  m_new = jnp.maximum(m, jnp.max(s, axis=-1))
  m_safe = jnp.where(jnp.isfinite(m_new), m_new, 0.0)
  scale = jnp.exp(jnp.where(jnp.isfinite(m), m - m_safe, -jnp.inf))
  return m_new, scale, jnp.exp(s - m_safe[:, None])


def _lse_from_stream(m, l):
  return jnp.where(l > 0, m + jnp.log(jnp.where(l > 0, l, 1.0)), -jnp.inf)


@functools.partial(jax.custom_jvp, nondiff_argnums=(4, 5))
def _flash_lse(zt, patterns, p_mask, beta, k, similarity):
  """`logsumexp(beta * zt . P_eff^T)` streamed over chunks of `k` patterns, shape `(B,)`."""
  return _flash_scan(zt, patterns, p_mask, beta, k, similarity)[0]


def _flash_scan(zt, patterns, p_mask, beta, k, similarity):
  """The flash recurrence: the logsumexp and the read-out `sum_mu alpha_mu P_eff_mu` (B, M*d)."""
  b = zt.shape[0]

  def body(carry, c):
    m, l, acc = carry
    p_eff, valid, _, _ = _chunk(patterns, p_mask, c, k, similarity)
    s = jnp.where(valid, beta * (zt @ p_eff.T), -jnp.inf)
    m_new, scale, w = _online_softmax_step(m, s)
    return (m_new, l * scale + jnp.sum(w, -1), acc * scale[:, None] + w @ p_eff), None

  init = (jnp.full((b,), -jnp.inf, zt.dtype), jnp.zeros((b,), zt.dtype), jnp.zeros_like(zt))
  (m, l, acc), _ = jax.lax.scan(body, init, jnp.arange(_num_chunks(patterns.shape[0], k)))
  return _lse_from_stream(m, l), acc / jnp.where(l > 0, l, 1.0)[:, None]


def _flash_lse_jvp(k, similarity, primals, tangents):
  """`d lse = beta <dzt, r> + dbeta <r, zt> + beta sum_mu alpha_mu <zt, dP_eff_mu>`.

  The read-out `r` comes out of the forward stream, so the usual reverse pass (the gradient
  with respect to the state) costs no second score pass. Only when the patterns themselves are
  differentiated does a second stream recompute `alpha` chunk by chunk (symbolic zeros tell).
  """
  zt, patterns, p_mask, beta = primals
  d_zt, d_p, _, d_beta = tangents
  zero = jax.custom_derivatives.SymbolicZero
  lse, readout = _flash_scan(zt, patterns, p_mask, beta, k, similarity)
  tangent = jnp.zeros_like(lse)
  if not isinstance(d_zt, zero):
    tangent = tangent + beta * jnp.sum(d_zt * readout, -1)
  if not isinstance(d_beta, zero):
    tangent = tangent + d_beta * jnp.sum(readout * zt, -1)
  if not isinstance(d_p, zero):

    def body(acc, c):
      p_eff, valid, _, start = _chunk(patterns, p_mask, c, k, similarity)
      p = jax.lax.dynamic_slice_in_dim(patterns, start, k, 0)
      dp = jax.lax.dynamic_slice_in_dim(d_p, start, k, 0)
      q = jax.lax.dynamic_slice_in_dim(p_mask, start, k, 0)
      _, d_eff = jax.jvp(lambda p_: E.effective_patterns(p_, q, similarity=similarity), (p,), (dp,))
      alpha = jnp.where(valid, jnp.exp(beta * (zt @ p_eff.T) - lse[:, None]), 0.0)
      return acc + jnp.sum(alpha * (zt @ d_eff.T), -1), None

    dp_term, _ = jax.lax.scan(body, jnp.zeros_like(lse), jnp.arange(_num_chunks(patterns.shape[0], k)))
    tangent = tangent + beta * dp_term
  return lse, tangent


_flash_lse.defjvp(_flash_lse_jvp, symbolic_zeros=True)


def _stream_top_k(zt, patterns, p_mask, k, chunk, similarity, beta):
  """Top `k` scaled scores over a stream of chunks, with their indices; also the logsumexp."""
  b = zt.shape[0]
  k_chunk = min(k, chunk)

  def body(carry, c):
    vals, idx, m, l = carry
    p_eff, valid, rows, _ = _chunk(patterns, p_mask, c, chunk, similarity)
    s = jnp.where(valid, beta * (zt @ p_eff.T), -jnp.inf)
    cv, ci = jax.lax.top_k(s, k_chunk)
    all_v = jnp.concatenate([vals, cv], -1)
    all_i = jnp.concatenate([idx, rows[ci]], -1)
    nv, order = jax.lax.top_k(all_v, k)
    m_new, scale, w = _online_softmax_step(m, s)
    l = l * scale + jnp.sum(w, -1)
    return (nv, jnp.take_along_axis(all_i, order, -1), m_new, l), None

  init = (jnp.full((b, k), -jnp.inf, zt.dtype), jnp.zeros((b, k), jnp.int32),
          jnp.full((b,), -jnp.inf, zt.dtype), jnp.zeros((b,), zt.dtype))
  (vals, idx, m, l), _ = jax.lax.scan(body, init, jnp.arange(_num_chunks(patterns.shape[0], chunk)))
  return vals, idx, _lse_from_stream(m, l)


def _candidate_scores(zt, patterns, p_mask, idx, similarity):
  """Scores of each example against its own candidate patterns `idx` (B, K): (B, K)."""
  b, kk = idx.shape
  p = patterns[idx]  # (B, K, M, d)
  q = p_mask[idx]
  p_eff = jax.vmap(lambda p_, q_: E.effective_patterns(p_, q_, similarity=similarity))(p, q)
  return jnp.einsum("bf,bkf->bk", zt, p_eff)


# ----------------------------------------------------------------------------- one step


class _Setup(NamedTuple):
  patterns: jax.Array
  p_mask: jax.Array
  coupling: Any
  similarity: str
  norm: normalizers.Normalizer
  beta: Any
  lam: Any
  chunk: int | None
  sparse_k: int
  p_eff: Any = None  # dense path: the (N, M*d) effective patterns, computed once per call


def _score_energy(zt, cfg: _Setup):
  """`-(1/beta) Phi(beta s)` for the coupled state `zt` (B, M*d), and an aux output.

  aux: the dense scores (B, N), or for a chunked sparse normalizer the exactness flag.
  """
  if cfg.chunk is None:
    s = zt @ cfg.p_eff.T
    return -cfg.norm.phi(cfg.beta * s) / cfg.beta, s
  if cfg.norm.name == "softmax":
    lse = _flash_lse(zt, cfg.patterns, cfg.p_mask, cfg.beta, cfg.chunk, cfg.similarity)
    return -lse / cfg.beta, None
  vals, idx, _ = _stream_top_k(jax.lax.stop_gradient(zt), cfg.patterns, cfg.p_mask,
                               cfg.sparse_k, cfg.chunk, cfg.similarity, jax.lax.stop_gradient(cfg.beta))
  exact = vals[:, -1] <= vals[:, 0] - cfg.norm.support_width
  s = _candidate_scores(zt, cfg.patterns, cfg.p_mask, jax.lax.stop_gradient(idx), cfg.similarity)
  return -cfg.norm.phi(cfg.beta * s) / cfg.beta, exact


def _terms(z, a, cfg: _Setup):
  """Energy (B,), its gradient (B, M, d) and the read-out g (B, M, d) at state `z`, mask `a`.

  The read-out is `-dE/dzt` (coupled state), mapped back through the coupling:
  `g_m = sum_m' C_{m,m'} r_{m'}` with `r = sum_mu alpha_mu P_eff_mu`.
  """
  b, m, d = z.shape

  def total(z_, probe):
    zt = E.couple(z_, z_mask=a, coupling=cfg.coupling, similarity=cfg.similarity) + probe
    e_score, aux = _score_energy(zt, cfg)
    e = e_score + E.regularizer(z_, z_mask=a, lam=cfg.lam)
    return jnp.sum(e), (e, aux)

  (_, (e, aux)), (dz, dprobe) = jax.value_and_grad(total, argnums=(0, 1), has_aux=True)(
      z, jnp.zeros((b, m * d), z.dtype))
  r = -dprobe.reshape(b, m, d)
  g = r if cfg.coupling is None else jnp.einsum("mk,bkd->bmd", cfg.coupling, r)
  return e, dz, g, aux


def _update(z, a, dz, g, cfg: _Setup, method: str, eta):
  """One step of either dynamic; modalities missing from `a` are filled with the read-out."""
  if cfg.similarity == "cosine":
    fill = E._l2_normalize(g)
    if method == "fixed_point":
      new = fill
    else:
      dz_tan = dz - jnp.sum(dz * z, -1, keepdims=True) * z
      new = E._l2_normalize(z - eta * dz_tan)
    # A zero read-out (no pattern has the modality) leaves the state where it was.
    has_g = jnp.sum(g * g, -1, keepdims=True) > 1e-12
    new = jnp.where(has_g | (method != "fixed_point"), new, z)
  else:
    fill = g / cfg.lam
    new = fill if method == "fixed_point" else z - eta * dz
  return jnp.where(a[..., None], new, fill)


def readout(alpha: jax.Array, patterns: jax.Array, *, p_mask: Any = None, coupling: Any = None,
            similarity: str = "cosine") -> jax.Array:
  """The closed-form read-out `g_m = sum_mu alpha_mu sum_m' q_{mu,m'} C_{m,m'} p^_{mu,m'}`.

  `alpha` (B, N) -> (B, M, d). One fixed-point step is `g / lam` (dot) or `normalize(g)`
  (cosine); `retrieve` gets the same read-out from `jax.grad` of the energy (a test pins them).
  """
  n, m, d = patterns.shape
  r = (alpha @ E.effective_patterns(patterns, p_mask, similarity=similarity)).reshape(-1, m, d)
  return r if coupling is None else jnp.einsum("mk,bkd->bmd", jnp.asarray(coupling, r.dtype), r)


# ----------------------------------------------------------------------------- retrieve


def _final_outputs(z, cfg: _Setup, top_k):
  """Energy, attention / top-k and exactness at the final state (one more score pass)."""
  b, m, _ = z.shape
  a = jnp.ones((b, m), bool)
  zt = E.couple(z, z_mask=a, coupling=cfg.coupling, similarity=cfg.similarity)
  reg = E.regularizer(z, z_mask=a, lam=cfg.lam)
  exact = jnp.ones((b,), bool)
  if cfg.chunk is not None and top_k is not None:
    kk = max(top_k, cfg.sparse_k) if cfg.norm.name != "softmax" else top_k
    vals, idx, lse = _stream_top_k(zt, cfg.patterns, cfg.p_mask, kk, cfg.chunk, cfg.similarity, cfg.beta)
    if cfg.norm.name == "softmax":
      e = -lse / cfg.beta
      weights = jnp.exp(vals - lse[:, None])
    else:
      exact = vals[:, -1] <= vals[:, 0] - cfg.norm.support_width
      e = -cfg.norm.phi(vals) / cfg.beta
      weights = cfg.norm.probs(vals)[:, :top_k]
      idx = idx[:, :top_k]
    return e + reg, None, idx, weights, exact
  if cfg.chunk is None:
    s = zt @ cfg.p_eff.T
  else:  # the dense attention was asked for: assemble the (B, N) scores chunk by chunk
    n = cfg.patterns.shape[0]

    def body(out, c):
      p_eff, _, _, start = _chunk(cfg.patterns, cfg.p_mask, c, cfg.chunk, cfg.similarity)
      return jax.lax.dynamic_update_slice_in_dim(out, zt @ p_eff.T, start, 1), None

    s, _ = jax.lax.scan(body, jnp.zeros((b, n), zt.dtype), jnp.arange(_num_chunks(n, cfg.chunk)))
  e = -cfg.norm.phi(cfg.beta * s) / cfg.beta + reg
  alpha = cfg.norm.probs(cfg.beta * s)
  if top_k is None:
    return e, alpha, None, None, exact
  w, idx = jax.lax.top_k(alpha, top_k)
  return e, None, idx, w, exact


def retrieve(
    cue: jax.Array,
    patterns: jax.Array,
    *,
    cue_mask: Any,
    p_mask: Any = None,
    coupling: Any = None,
    similarity: str = "cosine",
    normalizer: str = "softmax",
    beta: Any = 1.0,
    lam: Any = 1.0,
    method: str = "gradient",
    step_size: Any = None,
    max_steps: int = 10,
    tol: float = 1e-4,
    clamp_cue: bool = False,
    chunk_size: int | None = None,
    top_k: int | None = None,
    final_pass: bool = True,
    sparse_k: int = 128,
    differentiable: bool = False,
) -> Retrieval:
  """Completes `cue` (B, M, d) by descending the energy over `patterns` (N, M, d).

  Args:
    cue: the cue; modalities where `cue_mask` is False are ignored (their values never matter).
    patterns: the memory. `p_mask` (N, M) says which modalities each pattern has.
    cue_mask: (B, M) bool, the modalities present in the cue.
    coupling, similarity, normalizer, beta, lam: the energy (see `cmhn_jax.energy`).
    method: 'gradient' or 'fixed_point' (module docstring).
    step_size: `eta` of the gradient method; default `1 / lam` under `dot`, and
      `1 / max_m sum_m' |C_{m,m'}|` under `cosine`; the energy never rises up to twice that.
    max_steps, tol: stop each example at `||z_{t+1} - z_t|| < tol` or after `max_steps` updates.
    clamp_cue: keep the cue's modalities fixed at the cue.
    chunk_size: stream the patterns `chunk_size` at a time (module docstring).
    top_k: return only the `top_k` largest attention weights and their indices.
    final_pass: score the final state once more for its energy and attention (one extra score
      GEMM). When False, `energies` holds z_0 .. z_{T-1} and `attention` is the one that produced
      the final state (None with `chunk_size`, which keeps no scores): T steps then cost exactly
      T score and T read-out GEMMs.
    sparse_k: candidates kept per example by a chunked sparse normalizer.
    differentiable: run exactly `max_steps` iterations with `lax.scan` (reverse-mode
      differentiable) instead of an early-exit `lax.while_loop`.

  Returns:
    A `Retrieval`.
  """
  b, n, m, d = E.check_inputs(cue, patterns, z_mask=cue_mask, p_mask=p_mask, coupling=coupling,
                              similarity=similarity, normalizer=normalizer, beta=beta,
                              z_name="cue", z_mask_name="cue_mask")
  if method not in METHODS:
    raise ValueError(f"method={method!r} is unknown; expected one of {METHODS}.")
  if not isinstance(max_steps, int) or max_steps < 1:
    raise ValueError(f"max_steps must be a positive int; got {max_steps!r}.")
  if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
    raise ValueError(f"chunk_size must be a positive int or None; got {chunk_size!r}.")
  if top_k is not None and not 1 <= top_k <= n:
    raise ValueError(f"top_k must be in [1, N={n}]; got {top_k!r}.")
  if top_k is not None and chunk_size is not None and not final_pass:
    raise ValueError("top_k with chunk_size needs final_pass=True: a stream keeps no scores of "
                     "the state before the last step.")
  cue = jnp.asarray(cue)
  dtype = cue.dtype if jnp.issubdtype(cue.dtype, jnp.floating) else jnp.float32
  cue = cue.astype(dtype)
  cue_mask = jnp.asarray(cue_mask).astype(bool)
  p_mask = jnp.ones((n, m), bool) if p_mask is None else jnp.asarray(p_mask).astype(bool)
  if coupling is not None:
    coupling = jnp.asarray(coupling, dtype)
  norm = normalizers.get(normalizer)
  patterns = jnp.asarray(patterns, dtype)
  # Dense: normalise and mask the patterns once, not at every step of the loop.
  p_eff = (E.effective_patterns(patterns, p_mask, similarity=similarity)
           if chunk_size is None else None)
  cfg = _Setup(patterns, p_mask, coupling, similarity, norm, beta, lam,
               None if chunk_size is None else min(chunk_size, n), min(sparse_k, n), p_eff)
  if step_size is None:
    if similarity == "dot":
      step_size = 1.0 / lam
    else:
      row = 1.0 if coupling is None else jnp.max(jnp.sum(jnp.abs(coupling), -1))
      step_size = 1.0 / row

  z0 = jnp.where(cue_mask[..., None], cue, 0.0)
  if similarity == "cosine":
    z0 = E._l2_normalize(z0)
  n_trace = max_steps + 1 if final_pass else max_steps
  track_attention = not final_pass
  full = jnp.ones((b, m), bool)

  def body(carry):
    t, z, trace, steps, done, att, exact = carry
    a = jnp.where(t == 0, cue_mask, full)
    e, dz, g, aux = _terms(z, a, cfg)
    new = _update(z, a, dz, g, cfg, method, step_size)
    if clamp_cue:
      new = jnp.where(cue_mask[..., None], z0, new)
    new = jnp.where(done[:, None, None], z, new)
    delta = jnp.sqrt(jnp.sum((new - z) ** 2, axis=(1, 2)))
    trace = trace.at[t].set(e)
    if track_attention and cfg.chunk is None:
      att = jnp.where(done[:, None], att, norm.probs(beta * aux))
    if cfg.chunk is not None and norm.name != "softmax":
      exact = exact & aux
    steps = steps + (~done).astype(jnp.int32)
    return t + 1, new, trace, steps, done | (delta < tol), att, exact

  att0 = jnp.zeros((b, n), dtype) if track_attention and cfg.chunk is None else None
  carry = (jnp.int32(0), z0, jnp.zeros((n_trace, b), dtype), jnp.zeros((b,), jnp.int32),
           jnp.zeros((b,), bool), att0, jnp.ones((b,), bool))
  if differentiable:
    carry, _ = jax.lax.scan(lambda c, _: (body(c), None), carry, None, length=max_steps)
  else:
    carry = jax.lax.while_loop(lambda c: (c[0] < max_steps) & ~jnp.all(c[4]), body, carry)
  t_end, z, trace, steps, done, att, exact = carry

  top_i = top_w = None
  if final_pass:
    e_fin, att, top_i, top_w, exact_fin = _final_outputs(z, cfg, top_k)
    exact = exact & exact_fin
    last = e_fin
    trace = jnp.where(jnp.arange(n_trace)[:, None] >= t_end, e_fin[None], trace)
  else:
    last = trace[jnp.maximum(t_end - 1, 0)]
    trace = jnp.where(jnp.arange(n_trace)[:, None] >= t_end, last[None], trace)
    if top_k is not None:
      top_w, top_i = jax.lax.top_k(att, top_k)
      att = None
  return Retrieval(state=z, attention=att, energies=trace, steps=steps, converged=done,
                   top_indices=top_i, top_weights=top_w, exact=exact)
