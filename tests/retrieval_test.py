"""Properties of the retrieval dynamics (DESIGN.md section 2)."""

import itertools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cmhn_jax import energy as E
from cmhn_jax import retrieval as R

NORMS = ("softmax", "sparsemax", "entmax15")
SIMS = ("dot", "cosine")
METHODS = ("gradient", "fixed_point")


def _memory(seed=0, n=40, m=3, d=16, scale=1.0):
  return scale * jax.random.normal(jax.random.PRNGKey(seed), (n, m, d))


def _noisy_cue(patterns, idx, noise, seed=1):
  cue = patterns[jnp.asarray(idx)]
  return cue + noise * jax.random.normal(jax.random.PRNGKey(seed), cue.shape)


def _beta(sim):
  return 6.0 if sim == "cosine" else 0.3


@pytest.mark.parametrize("sim,name,method", itertools.product(SIMS, NORMS, METHODS))
def test_energy_never_rises(sim, name, method):
  p = _memory(scale=0.6 if sim == "dot" else 1.0)
  cue = _noisy_cue(p, jnp.arange(6), 1.0)
  mask = jnp.array([[True, False, False], [False, True, True]] * 3)
  c = jnp.eye(3) + 0.2 * (1 - jnp.eye(3))
  r = R.retrieve(cue, p, cue_mask=mask, coupling=c, similarity=sim, normalizer=name,
                 beta=_beta(sim), lam=0.8, method=method, max_steps=12, tol=0.0)
  chex.assert_shape(r.energies, (13, 6))
  rises = jnp.diff(r.energies[1:], axis=0)  # comparable from the first step on
  assert jnp.max(rises) <= 1e-5 * (1 + jnp.max(jnp.abs(r.energies))), rises
  # ... and the energies are those of `energy` at the returned state.
  full = jnp.ones_like(mask)
  want = E.energy(r.state, p, z_mask=full, coupling=c, similarity=sim, normalizer=name,
                  beta=_beta(sim), lam=0.8)
  np.testing.assert_allclose(r.energies[-1], want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("sim", SIMS)
def test_gradient_descent_is_monotone_up_to_twice_the_default_step(sim):
  p = _memory(seed=3)
  cue = _noisy_cue(p, jnp.arange(5), 1.5)
  mask = jnp.ones((5, 3), bool)
  eta = 2.0 / 0.5 if sim == "dot" else 2.0
  r = R.retrieve(cue, p, cue_mask=mask, similarity=sim, beta=_beta(sim), lam=0.5,
                 method="gradient", step_size=0.999 * eta, max_steps=15, tol=0.0)
  assert jnp.max(jnp.diff(r.energies, axis=0)) <= 1e-5


@pytest.mark.parametrize("name", NORMS)
def test_fixed_point_equals_gradient_step_with_eta_one_over_lam(name):
  p = _memory(seed=4, scale=0.5)
  cue = _noisy_cue(p, jnp.arange(4), 0.5)
  mask = jnp.array([[True, True, False], [True, False, False], [True, True, True], [False, True, False]])
  c = jnp.array([[1.0, 0.3, 0.0], [0.2, 0.8, 0.1], [0.0, 0.4, 1.2]])
  kw = dict(cue_mask=mask, coupling=c, similarity="dot", normalizer=name, beta=0.4, lam=1.7,
            max_steps=5, tol=0.0)
  fp = R.retrieve(cue, p, method="fixed_point", **kw)
  gd = R.retrieve(cue, p, method="gradient", step_size=1 / 1.7, **kw)
  np.testing.assert_allclose(fp.state, gd.state, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(fp.energies, gd.energies, rtol=1e-5, atol=1e-5)


def test_fixed_point_is_the_closed_form_readout():
  # z_m <- g_m / lam = sum_mu alpha_mu sum_m' q C_{m m'} p_{mu m'} / lam, alpha from `attention`.
  p = _memory(seed=5, scale=0.5)
  pm = jax.random.bernoulli(jax.random.PRNGKey(8), 0.7, p.shape[:2])
  cue = _noisy_cue(p, jnp.arange(3), 0.3)
  mask = jnp.ones((3, 3), bool)
  c = jnp.eye(3) + 0.25
  r = R.retrieve(cue, p, cue_mask=mask, p_mask=pm, coupling=c, similarity="dot", beta=0.7,
                 lam=2.0, method="fixed_point", max_steps=1, tol=0.0)
  alpha = E.attention(cue, p, z_mask=mask, p_mask=pm, coupling=c, similarity="dot", beta=0.7)
  g = jnp.einsum("bn,mk,nk,nkd->bmd", alpha, c, pm.astype(p.dtype), p)
  np.testing.assert_allclose(r.state, g / 2.0, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(R.readout(alpha, p, p_mask=pm, coupling=c, similarity="dot"), g,
                             rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name,method", itertools.product(NORMS, METHODS))
def test_separated_patterns_are_fixed_points_at_large_beta(name, method):
  p = E._l2_normalize(_memory(seed=6, n=30, d=32))
  r = R.retrieve(p, p, cue_mask=jnp.ones((30, 3), bool), similarity="cosine", normalizer=name,
                 beta=1e3, method=method, max_steps=5, tol=1e-5)
  np.testing.assert_allclose(r.state, p, atol=1e-4)
  assert jnp.all(r.converged)
  np.testing.assert_array_equal(jnp.argmax(r.attention, -1), jnp.arange(30))


@pytest.mark.parametrize("sim,name,method", itertools.product(SIMS, NORMS, METHODS))
def test_single_modality_cue_completes_the_right_pattern(sim, name, method):
  p = E._l2_normalize(_memory(seed=7, n=50, d=32))
  idx = jnp.array([3, 17, 42, 8, 25, 0])
  cue = E._l2_normalize(_noisy_cue(p, idx, 0.08))  # noisy image only
  mask = jnp.zeros((6, 3), bool).at[:, 0].set(True)
  r = R.retrieve(cue, p, cue_mask=mask, similarity=sim, normalizer=name, beta=30.0 if sim == "dot" else 30.0,
                 method=method, max_steps=10)
  np.testing.assert_array_equal(jnp.argmax(r.attention, -1), idx)
  completed = E._l2_normalize(r.state[:, 1:])
  cos = jnp.sum(completed * p[idx, 1:], -1)
  assert jnp.all(cos > 0.99), cos


@pytest.mark.parametrize(
    "sim,name,chunk",
    # every similarity x normalizer with a chunk that does not divide N = 40, and for softmax
    # (the streamed flash recurrence) single rows, a divisor, exactly N and more than N.
    [(s, n, 7) for s, n in itertools.product(SIMS, NORMS)]
    + [("cosine", "softmax", c) for c in (1, 8, 40, 64)])
def test_chunked_equals_dense(sim, name, chunk):
  p = _memory(seed=9, n=40, scale=0.7 if sim == "dot" else 1.0)
  pm = jax.random.bernoulli(jax.random.PRNGKey(2), 0.8, p.shape[:2]).at[:, 0].set(True)
  cue = _noisy_cue(p, jnp.arange(5), 0.7)
  mask = jnp.array([[True, False, False]] * 3 + [[False, True, True]] * 2)
  kw = dict(cue_mask=mask, p_mask=pm, coupling=jnp.eye(3) + 0.1, similarity=sim, normalizer=name,
            beta=_beta(sim), max_steps=6)
  dense = R.retrieve(cue, p, **kw)
  chunked = R.retrieve(cue, p, chunk_size=chunk, sparse_k=40, **kw)
  assert jnp.all(chunked.exact)
  np.testing.assert_allclose(chunked.state, dense.state, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(chunked.attention, dense.attention, rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(chunked.energies, dense.energies, rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(chunked.steps, dense.steps)
  top = R.retrieve(cue, p, chunk_size=chunk, top_k=5, sparse_k=40, **kw)
  want_w, want_i = jax.lax.top_k(dense.attention, 5)
  np.testing.assert_allclose(top.top_weights, want_w, rtol=1e-4, atol=1e-6)
  np.testing.assert_array_equal(top.top_indices[:, 0], want_i[:, 0])
  assert top.attention is None


def test_chunked_sparse_flags_a_support_larger_than_sparse_k():
  p = _memory(seed=10, n=64)
  cue = _noisy_cue(p, jnp.arange(2), 0.1)
  r = R.retrieve(cue, p, cue_mask=jnp.ones((2, 3), bool), normalizer="sparsemax", beta=0.01,
                 chunk_size=16, sparse_k=8, max_steps=2)
  assert not jnp.any(r.exact)  # beta tiny: almost uniform, support ~ N > 8


def test_chunked_gradient_wrt_patterns_and_beta_equals_dense():
  p = _memory(seed=11, n=23)
  cue = _noisy_cue(p, jnp.arange(3), 0.5)
  mask = jnp.array([[True, False, True]] * 3)

  def loss(p_, beta, chunk):
    r = R.retrieve(cue, p_, cue_mask=mask, beta=beta, chunk_size=chunk, max_steps=3, tol=0.0,
                   differentiable=True)
    return jnp.sum(r.state[:, 1] * p[:3, 1]) + jnp.sum(r.energies)

  dense = jax.grad(loss, argnums=(0, 1))(p, 4.0, None)
  chunked = jax.grad(loss, argnums=(0, 1))(p, 4.0, 5)
  chex.assert_trees_all_close(chunked, dense, rtol=1e-4, atol=1e-5)
  assert jnp.abs(dense[1]) > 0


def test_gradient_through_retrieval_matches_finite_differences():
  p = _memory(seed=12, n=10, d=6)
  cue = _noisy_cue(p, jnp.arange(2), 0.3)
  mask = jnp.array([[True, False, False], [False, True, False]])
  direction = jax.random.normal(jax.random.PRNGKey(0), p.shape)

  def f(p_):
    r = R.retrieve(cue, p_, cue_mask=mask, beta=3.0, normalizer="entmax15", max_steps=3, tol=0.0,
                   differentiable=True)
    return jnp.sum(r.state[:, 2, :2])

  g = jnp.vdot(jax.grad(f)(p), direction)
  h = 1e-3
  fd = (f(p + h * direction) - f(p - h * direction)) / (2 * h)
  np.testing.assert_allclose(g, fd, rtol=2e-2, atol=1e-3)


def test_per_example_steps_and_clamping():
  p = E._l2_normalize(_memory(seed=13, n=20))
  cue = jnp.concatenate([p[:2], _noisy_cue(p, jnp.arange(2, 4), 1.0)])
  mask = jnp.array([[True, True, False]] * 4)
  r = R.retrieve(cue, p, cue_mask=mask, beta=20.0, max_steps=30, tol=1e-5, clamp_cue=True)
  np.testing.assert_allclose(r.state[:, :2], E._l2_normalize(cue[:, :2]), atol=1e-6)
  assert jnp.all(r.converged)
  assert r.steps[0] < r.steps[2] or r.steps[1] < r.steps[3]  # exact cues settle sooner
  one = R.retrieve(cue[2:3], p, cue_mask=mask[2:3], beta=20.0, max_steps=30, tol=1e-5, clamp_cue=True)
  np.testing.assert_allclose(one.state[0], r.state[2], atol=1e-6)
  assert one.steps[0] == r.steps[2]


def test_empty_cue_gives_a_finite_documented_result():
  p = _memory(seed=14, n=15)
  for sim in SIMS:
    r = R.retrieve(jnp.full((2, 3, 16), jnp.nan), p, cue_mask=jnp.zeros((2, 3), bool),
                   similarity=sim, beta=2.0, max_steps=1, lam=1.0)
    chex.assert_tree_all_finite(r.state)
    # all scores are 0, so the first step fills each modality with the uniform average.
    mean = jnp.mean(p if sim == "dot" else E._l2_normalize(p), axis=0)
    want = mean if sim == "dot" else E._l2_normalize(mean)
    np.testing.assert_allclose(r.state[0], want, rtol=1e-5, atol=1e-6)


def test_jits_once_per_shape_vmaps_and_final_pass_off():
  p = _memory(seed=15, n=32)
  mask = jnp.array([[True, False, False]] * 4)

  @jax.jit
  @chex.assert_max_traces(n=1)
  def run(cue):
    return R.retrieve(cue, p, cue_mask=mask, beta=5.0, max_steps=4, chunk_size=8)

  a = run(_noisy_cue(p, jnp.arange(4), 0.2))
  b = run(_noisy_cue(p, jnp.arange(4, 8), 0.2, seed=3))
  assert not jnp.allclose(a.state, b.state)
  per = jax.vmap(lambda c, mk: R.retrieve(c[None], p, cue_mask=mk[None], beta=5.0, max_steps=4).state[0])
  np.testing.assert_allclose(per(_noisy_cue(p, jnp.arange(4), 0.2), mask), a.state, atol=1e-5)
  nofin = R.retrieve(_noisy_cue(p, jnp.arange(4), 0.2), p, cue_mask=mask, beta=5.0, max_steps=4,
                     final_pass=False, tol=0.0)
  chex.assert_shape(nofin.energies, (4, 4))
  np.testing.assert_allclose(nofin.state, a.state, atol=1e-5)
  np.testing.assert_allclose(nofin.energies, a.energies[:4], atol=1e-5)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(cue=jnp.zeros((2, 3, 4))), r"cue must have shape \(B, M, d\) = \(B, 3, 8\)"),
        (dict(cue=jnp.zeros((3, 8))), r"cue must have shape"),
        (dict(cue_mask=jnp.ones((2, 2), bool)), r"cue_mask must have shape \(2, 3\)"),
        (dict(p_mask=jnp.ones((6, 3), bool)), r"p_mask must have shape \(5, 3\)"),
        (dict(similarity="euclid"), r"similarity='euclid' is unknown"),
        (dict(normalizer="argmax"), r"normalizer='argmax' is unknown"),
        (dict(beta=0.0), r"beta must be > 0"),
        (dict(method="adam"), r"method='adam' is unknown.*fixed_point"),
        (dict(max_steps=0), r"max_steps must be a positive int"),
        (dict(chunk_size=0), r"chunk_size must be a positive int"),
        (dict(top_k=6), r"top_k must be in \[1, N=5\]"),
    ],
)
def test_bad_input_raises_a_clear_error(kwargs, match):
  args = dict(cue=jnp.zeros((2, 3, 8)), patterns=jnp.ones((5, 3, 8)), cue_mask=jnp.ones((2, 3), bool))
  args.update(kwargs)
  with pytest.raises(ValueError, match=match):
    R.retrieve(args.pop("cue"), args.pop("patterns"), **args)
