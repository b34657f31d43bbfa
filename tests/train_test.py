"""The trainer: one compile, resume == uninterrupted, SIGTERM, bad checkpoints, NaN, the report."""

import hashlib
import json
import os
import signal
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from cmhn_jax import evaluators
from cmhn_jax import losses
from cmhn_jax import train
from cmhn_jax.evaluators import retrieval as retrieval_eval

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_config(data_config, **overrides) -> ml_collections.ConfigDict:
  """configs/shapes.py:runlocal with very small encoders (fast to compile)."""
  sys.path.insert(0, ROOT)
  from configs import shapes  # pylint: disable=g-import-not-at-top
  c = shapes.get_config("runlocal")
  c.data = ml_collections.ConfigDict(data_config.to_dict())
  c.model.embed_dim = 16
  c.model.encoders.image.update(out_dim=16, widths=(8, 16))
  c.model.encoders.text.update(out_dim=16, width=16, depth=1)
  c.model.encoders.audio.update(out_dim=16, widths=(16, 16), strides=(2, 2), depth=0)
  c.model.memory.num_patterns = 8
  c.batch_size = 8
  c.num_steps = 4
  c.log_every = 2
  c.checkpoint.every = 2
  c.checkpoint.async_save = False
  c.evaluators.retrieval.batch_size = 16
  # Some biases sit right before a norm that removes them: their gradient is zero up to
  # float noise, which Adam's tiny eps would blow up to full-size steps of arbitrary sign.
  # A larger eps keeps sharded-vs-unsharded comparisons about the dynamics, not that noise.
  c.optimizer.eps = 1e-5
  for k, v in overrides.items():
    node = c
    *parents, leaf = k.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = v
  return c


def _params(state):
  return jax.device_get(state["params"])


def _tree_digest(path):
  h = hashlib.sha256()
  for root, _, files in sorted(os.walk(path)):
    for f in sorted(files):
      with open(os.path.join(root, f), "rb") as fh:
        h.update(f.encode() + fh.read())
  return h.hexdigest()


@pytest.fixture(scope="module")
def straight_run(shapes_tiny_config, tmp_path_factory):
  """4 uninterrupted steps; shared by several tests."""
  workdir = str(tmp_path_factory.mktemp("straight"))
  config = tiny_config(shapes_tiny_config)
  results = train.train_and_evaluate(config, workdir)
  state, _ = train.train(config, workdir)  # already at num_steps: restores, trains nothing
  return config, workdir, results, state


def test_resumed_run_equals_uninterrupted(straight_run, shapes_tiny_config, tmp_path):
  config, _, _, straight = straight_run
  half = tiny_config(shapes_tiny_config, num_steps=2)
  train.train(half, str(tmp_path))
  resumed, _ = train.train(config, str(tmp_path))  # same workdir: resumes from step 2
  assert int(resumed["step"]) == 4
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
                         _params(resumed), _params(straight))


def test_update_compiles_once_and_state_is_a_plain_pytree(shapes_tiny_config):
  from cmhn_jax import data  # pylint: disable=g-import-not-at-top
  config = tiny_config(shapes_tiny_config)
  mesh = train.make_mesh(config.mesh)
  pipe = data.get_pipeline(config.data, "train", train=True, global_batch_size=8)
  state, setup = train.create_state(config, pipe.info, mesh)
  assert set(state) == {"params", "rest", "opt", "step", "rng"}
  step_fn = train.jit_update(setup, config)
  it = iter(pipe)
  before = jax.device_get(state["params"]["patterns"])
  for i in range(3):
    state, metrics = step_fn(state, jax.random.PRNGKey(i), data.to_global_batch(next(it), mesh))
  pipe.close()
  assert step_fn._cache_size() == 1  # pylint: disable=protected-access
  assert int(state["step"]) == 3 and bool(metrics["finite"])
  assert not np.allclose(before, jax.device_get(state["params"]["patterns"]))


def test_report_has_every_directed_pair_and_both_rankers(straight_run):
  _, workdir, results, _ = straight_run
  with open(os.path.join(workdir, "report", "metrics.json")) as f:
    saved = json.load(f)
  assert saved["retrieval"] == json.loads(json.dumps(results["retrieval"]))
  pairs = [f"{a}->{b}" for a in ("image", "text", "audio") for b in ("image", "text", "audio") if a != b]
  for ranker in ("embedding", "cmhn", "cmhn_stored"):
    assert sorted(saved["retrieval"][ranker]) == sorted(pairs)
    for pair in pairs:
      m = saved["retrieval"][ranker][pair]
      assert 0 <= m["R@1"] <= m["R@5"] <= m["R@10"] <= 1
  assert saved["train"]["examples_per_sec"] > 0 and 0 < saved["train"]["mfu"] < 1
  for name in ("report.md", "recall_at_1.png", "training.png"):
    assert os.path.getsize(os.path.join(workdir, "report", name)) > 0
  assert os.path.exists(os.path.join(workdir, "config.json"))
  assert any(f.startswith("events.out.tfevents") for f in os.listdir(os.path.join(workdir, "events")))


def test_beta_overrides_reach_only_their_own_memory(straight_run):
  config, workdir, _, _ = straight_run
  state, setup = train.train(config, workdir)  # restores the finished run; trains nothing
  model = train.merge_model(setup, state)
  learned_beta = float(model.beta())
  ev_config = ml_collections.ConfigDict(config.evaluators.retrieval.to_dict())
  ev_config.cmhn_beta, ev_config.stored_beta = None, 3.0
  memories = retrieval_eval.RetrievalEvaluator(ev_config, config.data)._memories(state, setup, model)
  assert float(memories["cmhn"]["beta"]) == pytest.approx(learned_beta)
  assert float(memories["cmhn_stored"]["beta"]) == 3.0
  ev_config.cmhn_beta, ev_config.stored_beta = 11.0, None
  memories = retrieval_eval.RetrievalEvaluator(ev_config, config.data)._memories(state, setup, model)
  assert float(memories["cmhn"]["beta"]) == float(memories["cmhn_stored"]["beta"]) == 11.0


def test_checkpoint_of_another_model_is_refused_and_untouched(straight_run, shapes_tiny_config):
  _, workdir, _, _ = straight_run
  ckpt = os.path.join(workdir, "checkpoints")
  digest = _tree_digest(ckpt)
  other = tiny_config(shapes_tiny_config, **{"model.embed_dim": 24, "num_steps": 6})
  with pytest.raises(train.CheckpointMismatchError, match="different model.*new --workdir"):
    train.train(other, workdir)
  assert _tree_digest(ckpt) == digest


def test_nonfinite_loss_stops_with_the_step_and_keeps_the_last_good_checkpoint(
    straight_run, shapes_tiny_config, tmp_path):
  config = tiny_config(shapes_tiny_config, num_steps=2)
  train.train(config, str(tmp_path))
  bad = tiny_config(shapes_tiny_config, num_steps=4, **{"loss.energy": float("nan")})
  with pytest.raises(train.NonFiniteLossError, match="not finite at step 3.*checkpoint \\(2\\)"):
    train.train(bad, str(tmp_path))
  steps = sorted(int(d) for d in os.listdir(tmp_path / "checkpoints") if d.isdigit())
  assert steps[-1] == 2
  state, _ = train.train(config, str(tmp_path))  # the good checkpoint still restores
  assert int(state["step"]) == 2


def test_sigterm_finishes_the_step_saves_and_returns(shapes_tiny_config, tmp_path, monkeypatch):
  config = tiny_config(shapes_tiny_config, num_steps=50, log_every=1)
  config.checkpoint.every = 100
  real_log = train.Progress.log

  def log_and_signal(self, step, metrics):
    real_log(self, step, metrics)
    if step == 2:
      os.kill(os.getpid(), signal.SIGTERM)

  monkeypatch.setattr(train.Progress, "log", log_and_signal)
  state, setup = train.train(config, str(tmp_path))
  assert int(state["step"]) == 2 and setup.train_stats["stopped_early"] is True
  steps = sorted(int(d) for d in os.listdir(tmp_path / "checkpoints") if d.isdigit())
  assert steps == [2]


def test_unknown_loss_term_and_mode_are_refused(shapes_tiny_config, tmp_path):
  with pytest.raises(ValueError, match="unknown terms \\['infonse'\\].*infonce"):
    train.train(tiny_config(shapes_tiny_config, **{"loss.infonse": 1.0}), str(tmp_path))
  with pytest.raises(ValueError, match="mode='tune'"):
    train.train_and_evaluate(tiny_config(shapes_tiny_config), str(tmp_path), mode="tune")
  with pytest.raises(FileNotFoundError, match="Nothing to evaluate"):
    train.train_and_evaluate(tiny_config(shapes_tiny_config), str(tmp_path / "empty"), mode="eval")


def test_cli_rejects_an_unknown_config_key(tmp_path):
  out = subprocess.run(
      [sys.executable, "-m", "cmhn_jax.main", "--config=configs/shapes.py:runlocal",
       f"--workdir={tmp_path}", "--config.num_stepz=3"],
      cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert out.returncode != 0
  assert "num_stepz" in out.stderr


def test_optional_config_keys_can_be_set_from_the_command_line(shapes_tiny_config, tmp_path):
  """A key whose default is None must be a typed placeholder, or `--config.key=v` is refused
  before anything runs. Here the overrides parse and the run gets as far as finding no
  checkpoint to evaluate."""
  out = subprocess.run(
      [sys.executable, "-m", "cmhn_jax.main", "--config=configs/shapes.py:runlocal",
       f"--workdir={tmp_path}", "--mode=eval", "--config.evaluators.retrieval.cmhn_beta=50",
       "--config.data.cache=False", f"--config.data.data_dir={shapes_tiny_config.data_dir}"],
      cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert out.returncode != 0
  assert "Nothing to evaluate" in out.stderr, out.stderr[-2000:]


# ----------------------------------------------------------------------------- metrics & losses


def test_ranking_metrics_by_hand():
  sims = np.array([[0.9, 0.8, 0.1], [0.2, 0.3, 0.9]])
  relevant = np.array([[False, True, False], [True, False, False]])
  m = retrieval_eval.ranking_metrics(sims, relevant, ks=(1, 2, 3))
  assert m["R@1"] == 0.0 and m["R@2"] == 0.5 and m["R@3"] == 1.0
  np.testing.assert_allclose(m["mAP"], (1 / 2 + 1 / 3) / 2)


def _ctx(z, mask=None, group=None, **memory):
  b, m, d = z.shape
  mem = dict(patterns=jax.random.normal(jax.random.PRNGKey(0), (6, m, d)), coupling=jnp.eye(m),
             similarity="cosine", normalizer="softmax", beta=jnp.asarray(5.0), lam=1.0)
  mem.update(memory)
  emb = {f"{k}/emb": z[:, i] for i, k in enumerate(("img", "txt", "aud")[:m])}
  return losses.LossContext(emb=emb, z=z, z_mask=jnp.ones((b, m), bool) if mask is None else mask,
                            valid=jnp.ones((b,), bool), memory=mem, logit_scale=jnp.asarray(10.0),
                            modalities=("image", "text", "audio")[:m],
                            options=ml_collections.ConfigDict({"cloob_beta": 14.3}), group=group)


def test_contrastive_losses_prefer_aligned_pairs():
  base = jax.random.normal(jax.random.PRNGKey(1), (8, 1, 16))
  base = base / jnp.linalg.norm(base, axis=-1, keepdims=True)
  aligned = jnp.concatenate([base, base], 1)
  shuffled = jnp.concatenate([base, base[::-1]], 1)
  for fn in (losses.infonce, losses.infoloob):
    assert fn(_ctx(aligned))[0] < fn(_ctx(shuffled))[0], fn.__name__
  # Completion through a memory that stores the aligned tuples: a cue recalls its own partner.
  memory = dict(patterns=aligned, beta=jnp.asarray(50.0))
  good, bad = (losses.completion(_ctx(z, **memory))[0] for z in (aligned, shuffled))
  assert good < 0.1 < bad


def test_energy_loss_holds_beta_and_coupling_fixed():
  z = jax.random.normal(jax.random.PRNGKey(2), (4, 3, 8))
  g = jax.grad(lambda beta, c: losses.energy(_ctx(z, beta=beta, coupling=c))[0], argnums=(0, 1))(
      jnp.asarray(5.0), jnp.eye(3))
  assert float(g[0]) == 0.0 and float(jnp.abs(g[1]).max()) == 0.0
  gp = jax.grad(lambda p: losses.energy(_ctx(z, patterns=p))[0])(jnp.ones((6, 3, 8)))
  assert float(jnp.abs(gp).max()) > 0


def test_missing_modalities_are_left_out_of_the_pairs():
  z = jax.random.normal(jax.random.PRNGKey(3), (6, 2, 8))
  z = z / jnp.linalg.norm(z, axis=-1, keepdims=True)
  mask = jnp.ones((6, 2), bool).at[:3, 1].set(False)
  changed = z.at[:3, 1].set(123.0)
  a, b = losses.infonce(_ctx(z, mask))[0], losses.infonce(_ctx(changed, mask))[0]
  np.testing.assert_allclose(a, b, rtol=1e-6)


def test_evaluator_registry_lists_known_names():
  with pytest.raises(ValueError, match="retrieval"):
    evaluators.build("zero_shot", ml_collections.ConfigDict(), None)


def _one_step_params(config):
  from cmhn_jax import data  # pylint: disable=g-import-not-at-top
  mesh = train.make_mesh(config.mesh)
  pipe = data.get_pipeline(config.data, "train", train=True, global_batch_size=config.batch_size)
  state, setup = train.create_state(config, pipe.info, mesh)
  batch = data.to_global_batch(next(iter(pipe)), mesh)
  pipe.close()
  state, metrics = train.jit_update(setup, config)(state, jax.random.PRNGKey(0), batch)
  return jax.device_get(state["params"]), jax.device_get(metrics)


def test_gradient_accumulation_equals_the_full_batch_for_a_per_example_loss(shapes_tiny_config):
  # The energy term is a mean over examples, so two microbatches of 4 give the full batch's
  # gradient (in-batch contrastive terms would not: their negatives change with the batch).
  kw = {"loss.infonce": 0.0, "loss.completion": 0.0, "loss.energy": 1.0}
  full, m_full = _one_step_params(tiny_config(shapes_tiny_config, **kw))
  accum, m_accum = _one_step_params(tiny_config(shapes_tiny_config, grad_accum_steps=2, **kw))
  np.testing.assert_allclose(m_accum["loss"], m_full["loss"], rtol=1e-5)
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), accum, full)


def test_bfloat16_compute_tracks_float32(shapes_tiny_config):
  _, m32 = _one_step_params(tiny_config(shapes_tiny_config))
  p16, m16 = _one_step_params(tiny_config(shapes_tiny_config, **{"model.dtype": "bfloat16"}))
  assert bool(m16["finite"])
  np.testing.assert_allclose(m16["loss"], m32["loss"], rtol=0.05)
  assert all(x.dtype == np.float32 for x in jax.tree_util.tree_leaves(p16))  # params stay f32


def test_kmeans_recovers_separated_clusters():
  from cmhn_jax import model as model_lib  # pylint: disable=g-import-not-at-top
  centers = jnp.eye(4, 16)
  pts = jnp.repeat(centers, 25, axis=0) + 0.05 * jax.random.normal(jax.random.PRNGKey(0), (100, 16))
  pts = pts / jnp.linalg.norm(pts, axis=-1, keepdims=True)
  found = model_lib.kmeans(pts, 4, rng=jax.random.PRNGKey(3))
  match = jnp.max(found @ centers.T, axis=0)  # every true center has a centroid next to it
  assert jnp.all(match > 0.99), match
  with pytest.raises(ValueError, match="at least k=200"):
    model_lib.kmeans(pts, 200, rng=jax.random.PRNGKey(0))


def test_kmeans_init_puts_patterns_on_embedded_tuples(shapes_tiny_config, tmp_path):
  config = tiny_config(shapes_tiny_config, num_steps=0, **{"model.memory.init": "kmeans",
                                                            "model.memory.kmeans_batches": 2})
  config.num_steps = 1
  config.optimizer.lr = 0.0  # keep the initial patterns as they are
  state, _ = train.train(config, str(tmp_path))
  p = np.asarray(state["params"]["patterns"])
  norms = np.linalg.norm(p.reshape(p.shape[0], -1), axis=-1)
  np.testing.assert_allclose(norms, 1.0, atol=1e-4)  # centroids of unit tuples / sqrt(M)


def test_group_positives_pull_every_same_group_item_in():
  # Two groups of two; each row's own pair is perfect, but its other same-group item is far.
  # Plain InfoNCE is content; with group positives the loss asks for the whole group.
  a = jnp.array([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0]])
  z = jnp.stack([a, a], 1)[..., None].repeat(2, -1).reshape(4, 2, 4)
  z = z / jnp.linalg.norm(z, axis=-1, keepdims=True)
  ctx = _ctx(z, group=None)
  grouped = ctx._replace(group=jnp.array([0, 0, 1, 1]),
                         options=ml_collections.ConfigDict({"group_positives": True}))
  clustered = jnp.stack([jnp.array([[1.0, 0], [1.0, 0], [-1.0, 0], [-1.0, 0]])] * 2, 1)
  clustered = jnp.concatenate([clustered, jnp.zeros((4, 2, 2))], -1)
  tight = grouped._replace(z=clustered)
  assert losses.infonce(grouped)[0] > losses.infonce(tight)[0]
  assert losses.infonce(ctx)[0] < losses.infonce(ctx._replace(z=clustered))[0]
