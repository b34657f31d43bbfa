"""Properties of the normalizers and energies (DESIGN.md section 1)."""

import itertools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cmhn_jax import energy as E
from cmhn_jax import normalizers

NORMS = ("softmax", "sparsemax", "entmax15")
SIMS = ("dot", "cosine")


def _rand(seed, *shape):
  return jax.random.normal(jax.random.PRNGKey(seed), shape)


# ----------------------------------------------------------------------------- normalizers


@pytest.mark.parametrize("name", NORMS)
def test_grad_phi_is_the_normalizer(name):
  norm = normalizers.get(name)
  x = 3.0 * _rand(0, 6, 9)
  grad = jax.vmap(jax.grad(norm.phi))(x)
  np.testing.assert_allclose(grad, norm.probs(x), atol=1e-6)


@pytest.mark.parametrize("name", NORMS)
def test_normalizer_is_a_distribution_and_shift_invariant(name):
  norm = normalizers.get(name)
  x = 4.0 * _rand(1, 5, 11)
  p = norm.probs(x)
  assert jnp.all(p >= 0)
  np.testing.assert_allclose(p.sum(-1), 1.0, atol=1e-6)
  np.testing.assert_allclose(norm.probs(x + 123.0), p, atol=1e-5)
  np.testing.assert_allclose(norm.phi(x + 5.0), norm.phi(x) + 5.0, atol=1e-5)


@pytest.mark.parametrize("name", ("sparsemax", "entmax15"))
def test_sparse_normalizers_give_exact_zeros(name):
  p = normalizers.get(name).probs(jnp.array([3.0, 2.9, 0.0, -1.0, -5.0]))
  assert p[2] == 0.0 and p[3] == 0.0 and p[4] == 0.0
  assert p[0] > p[1] > 0


def test_sparsemax_closed_form_on_two_elements():
  for x1, x2 in [(0.3, 0.0), (2.0, 0.0), (-0.4, 0.1), (0.0, 0.0)]:
    p = normalizers.sparsemax(jnp.array([x1, x2]))
    p1 = np.clip((x1 - x2 + 1) / 2, 0, 1)
    np.testing.assert_allclose(p, [p1, 1 - p1], atol=1e-6)


def test_entmax15_closed_form_on_two_elements():
  # p = [x/2 - tau]_+^2: with t = (x1 - x2) / 2, p2 = v^2, p1 = (v + t)^2, v = (sqrt(2 - t^2) - t) / 2.
  for x1, x2 in [(0.3, 0.0), (1.5, 0.0), (-0.8, 0.4), (3.0, 0.0)]:
    p = normalizers.entmax15(jnp.array([x1, x2]))
    t = (x1 - x2) / 2
    if abs(t) >= 1:
      want = [1.0, 0.0] if t > 0 else [0.0, 1.0]
    else:
      v = (np.sqrt(2 - t * t) - t) / 2
      want = [(v + t) ** 2, v**2]
    np.testing.assert_allclose(p, want, atol=1e-6)


def test_entmax15_solves_its_variational_problem():
  # p* maximises <p, x> + (4/3)(1 - sum p^1.5) over the simplex: no random point does better.
  x = jnp.array([1.0, 0.7, 0.2, -0.5, -2.0])
  obj = lambda p: jnp.dot(p, x) + (4 / 3) * (1 - jnp.sum(p**1.5))
  p_star = normalizers.entmax15(x)
  np.testing.assert_allclose(obj(p_star), normalizers.entmax15_phi(x), atol=1e-6)
  others = jax.random.dirichlet(jax.random.PRNGKey(3), jnp.ones(5), (2000,))
  assert jnp.all(jax.vmap(obj)(others) <= obj(p_star) + 1e-6)


@pytest.mark.parametrize("name", NORMS)
def test_normalizer_jacobian_matches_finite_differences(name):
  probs = normalizers.get(name).probs
  x = jnp.array([0.9, 0.55, 0.1, -0.35, -1.2], jnp.float64) if jax.config.x64_enabled else \
      jnp.array([0.9, 0.55, 0.1, -0.35, -1.2])
  jac = jax.jacfwd(probs)(x)
  h = 1e-3
  fd = jnp.stack([(probs(x + h * e) - probs(x - h * e)) / (2 * h) for e in jnp.eye(5)], -1)
  np.testing.assert_allclose(jac, fd, atol=2e-3)
  np.testing.assert_allclose(jax.jacrev(probs)(x), jac, atol=1e-5)


@pytest.mark.parametrize("name", NORMS)
def test_stable_for_large_beta_and_masked_entries(name):
  norm = normalizers.get(name)
  x = 1e3 * jnp.array([[1.0, 0.999, 0.5, -jnp.inf], [-jnp.inf] * 4])
  p, phi = norm.probs(x), norm.phi(x)
  assert jnp.all(jnp.isfinite(p))
  np.testing.assert_allclose(p[0].sum(), 1.0, atol=1e-6)
  assert p[0, 3] == 0.0 and jnp.all(p[1] == 0.0)
  assert jnp.isfinite(phi[0]) and phi[1] == -jnp.inf
  assert jnp.all(jnp.isfinite(jax.grad(lambda v: norm.phi(v).sum())(x[:1])))


def test_unknown_normalizer_lists_the_known_ones():
  with pytest.raises(ValueError, match="entmax15"):
    normalizers.get("sparsemax2")


# ----------------------------------------------------------------------------- energies


def _setup(seed=0, b=4, n=12, m=3, d=5):
  z = _rand(seed, b, m, d)
  p = _rand(seed + 1, n, m, d)
  z_mask = jax.random.bernoulli(jax.random.PRNGKey(seed + 2), 0.6, (b, m)).at[:, 0].set(True)
  p_mask = jax.random.bernoulli(jax.random.PRNGKey(seed + 3), 0.7, (n, m)).at[:, 1].set(True)
  c = jnp.eye(m) + 0.3 * _rand(seed + 4, m, m)
  return z, p, z_mask, p_mask, c


@pytest.mark.parametrize("sim", SIMS)
def test_scores_equal_the_definition(sim):
  z, p, zm, pm, c = _setup()
  s = E.scores(z, p, z_mask=zm, p_mask=pm, coupling=c, similarity=sim)
  chex.assert_shape(s, (4, 12))
  unit = lambda v: v / np.linalg.norm(v)
  want = np.zeros((4, 12))
  for b, mu, m1, m2 in itertools.product(range(4), range(12), range(3), range(3)):
    if zm[b, m1] and pm[mu, m2]:
      u, v = np.asarray(z[b, m1]), np.asarray(p[mu, m2])
      sim_val = u @ v if sim == "dot" else unit(u) @ unit(v)
      want[b, mu] += c[m1, m2] * sim_val
  np.testing.assert_allclose(s, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("sim,name", itertools.product(SIMS, NORMS))
def test_masked_values_change_nothing(sim, name):
  z, p, zm, pm, c = _setup(seed=5)
  kw = dict(z_mask=zm, p_mask=pm, coupling=c, similarity=sim, normalizer=name, beta=2.0, lam=0.7)
  z2 = jnp.where(zm[..., None], z, 100.0 * _rand(9, *z.shape))
  p2 = jnp.where(pm[..., None], p, -50.0 * _rand(10, *p.shape))
  e = E.energy(z, p, **kw)
  chex.assert_shape(e, (4,))
  np.testing.assert_allclose(E.energy(z2, p2, **kw), e, rtol=1e-6, atol=1e-6)
  g, g2 = (jax.grad(lambda v, q: E.energy(v, q, **kw).sum(), argnums=(0, 1))(*a) for a in ((z, p), (z2, p2)))
  chex.assert_trees_all_close(g, g2, atol=1e-5)
  # The gradient with respect to a masked-out modality is exactly zero.
  assert jnp.all(jnp.where(zm[..., None], 0.0, g[0]) == 0.0)


@pytest.mark.parametrize("sim,name", itertools.product(SIMS, NORMS))
def test_attention_is_the_gradient_of_the_first_term(sim, name):
  z, p, zm, pm, c = _setup(seed=7)
  beta = 3.0
  kw = dict(z_mask=zm, p_mask=pm, coupling=c, similarity=sim)
  s = E.scores(z, p, **kw)
  phi = normalizers.get(name).phi
  grad = jax.grad(lambda s_: (phi(beta * s_) / beta).sum())(s)
  np.testing.assert_allclose(E.attention(z, p, normalizer=name, beta=beta, **kw), grad, atol=1e-6)


def test_energy_equals_its_formula():
  z, p, zm, pm, c = _setup(seed=11)
  kw = dict(z_mask=zm, p_mask=pm, coupling=c, similarity="dot")
  s = E.scores(z, p, **kw)
  want = -jax.nn.logsumexp(2.5 * s, axis=-1) / 2.5 + 0.4 / 2 * jnp.sum(zm * jnp.sum(z**2, -1), -1)
  np.testing.assert_allclose(E.energy(z, p, beta=2.5, lam=0.4, **kw), want, rtol=1e-5)


def test_energy_is_stable_at_large_beta_and_scores():
  z, p, *_ = _setup(seed=13)
  for name in NORMS:
    e = E.energy(50.0 * z, 50.0 * p, similarity="dot", normalizer=name, beta=1e3)
    assert jnp.all(jnp.isfinite(e)), name


def test_energy_vmaps_and_jits():
  z, p, zm, pm, c = _setup(seed=17)
  f = jax.jit(lambda z_, m_: E.energy(z_, p, z_mask=m_, p_mask=pm, coupling=c))
  batched = jax.vmap(lambda z_, m_: f(z_[None], m_[None])[0])(z, zm)
  np.testing.assert_allclose(batched, f(z, zm), rtol=1e-6)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(z=jnp.zeros((2, 3))), r"z must have shape \(B, M, d\)"),
        (dict(z=jnp.zeros((2, 2, 5))), r"\(B, 3, 5\)"),
        (dict(patterns=jnp.zeros((4, 15))), r"patterns must have shape \(N, M, d\)"),
        (dict(z_mask=jnp.ones((2, 4), bool)), r"z_mask must have shape \(2, 3\)"),
        (dict(p_mask=jnp.ones((3, 3), bool)), r"p_mask must have shape \(4, 3\)"),
        (dict(coupling=jnp.eye(2)), r"coupling must have shape \(M, M\)"),
        (dict(similarity="l2"), r"similarity='l2' is unknown.*cosine"),
        (dict(normalizer="max"), r"normalizer='max' is unknown.*softmax"),
        (dict(beta=0.0), r"beta must be > 0"),
        (dict(beta=-1.0), r"beta must be > 0"),
    ],
)
def test_bad_input_raises_a_clear_error(kwargs, match):
  args = dict(z=jnp.zeros((2, 3, 5)), patterns=jnp.ones((4, 3, 5)))
  args.update(kwargs)
  with pytest.raises(ValueError, match=match):
    E.energy(args.pop("z"), args.pop("patterns"), **args)
