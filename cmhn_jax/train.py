"""Training and evaluation: `train_and_evaluate(config, workdir)` (DESIGN.md sections 4-7).

* The mesh (`config.mesh`, axes 'data' and 'memory') and the partition rules
  (`config.partition_rules`) come from the config; the state is created through
  `nnx.eval_shape` and the rules, so it is born sharded.
* The train state is a plain pytree `{params, rest, opt, step, rng}`; one pure
  `update_fn(state, rng, batch) -> (state, metrics)` is jitted once with explicit shardings
  and a donated state; the step's rng is `fold_in(rng, step)`.
* A non-finite loss or gradient leaves the state untouched inside the step; the host then
  stops the run with a message naming the step, so the last checkpoint stays the last good one.
* Orbax `CheckpointManager` in `WORKDIR/checkpoints`: params, optimiser state, step, rng, the
  per-process data-iterator state (grain's handler) and the model's fingerprint; async; resumes
  automatically. A checkpoint from another model is refused and never overwritten.
* SIGTERM (and SIGINT) finish the current step, save, and return normally (exit 0 from `main`).
* Logs: a console progress line, TensorBoard event files in `WORKDIR/events` (tensorboardX, no
  TensorFlow), the resolved config in `WORKDIR/config.json`.
* Evaluation: the evaluators named in `config.evaluators` (`cmhn_jax.evaluators`) write
  `WORKDIR/report/{metrics.json, report.md, *.png}`.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import re
import signal
import threading
import time
from typing import Any

from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax import nnx

from cmhn_jax import data as data_lib
from cmhn_jax import losses as losses_lib
from cmhn_jax import model as model_lib

P = jax.sharding.PartitionSpec


class CheckpointMismatchError(ValueError):
  """A checkpoint in the workdir was written by a different model."""


class NonFiniteLossError(FloatingPointError):
  """The loss or gradient became NaN or inf."""


# ----------------------------------------------------------------------------- mesh & sharding


def make_mesh(mesh_config) -> jax.sharding.Mesh:
  """A ('data', 'memory') mesh over all devices; one size may be -1 (the rest)."""
  names = tuple(mesh_config.keys())
  if set(names) != {"data", "memory"}:
    raise ValueError(f"config.mesh must name the axes 'data' and 'memory'; got {names}.")
  sizes = [int(mesh_config[n]) for n in names]
  total = jax.device_count()
  if sizes.count(-1) > 1:
    raise ValueError(f"config.mesh may leave only one axis at -1; got {dict(mesh_config)}.")
  if -1 in sizes:
    known = int(np.prod([s for s in sizes if s != -1]))
    sizes[sizes.index(-1)] = total // known
  if int(np.prod(sizes)) != total:
    raise ValueError(f"config.mesh {dict(zip(names, sizes))} does not use the {total} devices.")
  return jax.make_mesh(tuple(sizes), names, axis_types=(jax.sharding.AxisType.Auto,) * len(names))


def _path_str(path) -> str:
  parts = []
  for k in path:
    parts.append(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))))
  return "/".join(parts)


def partition_specs(tree, rules) -> Any:
  """PartitionSpecs for a pytree from `(regex, spec)` rules; the first match wins."""
  compiled = [(re.compile(rx), P(*spec)) for rx, spec in rules]

  def spec_for(path, leaf):
    name = _path_str(path)
    for rx, spec in compiled:
      if rx.search(name):
        if len(spec) > len(getattr(leaf, "shape", ())):
          raise ValueError(f"Partition rule {rx.pattern!r} -> {spec} has more axes than "
                           f"{name} of shape {leaf.shape}.")
        return spec
    return P()

  return jax.tree_util.tree_map_with_path(spec_for, tree)


# ----------------------------------------------------------------------------- state


def build_model(config, info, rng) -> model_lib.CMHN:
  return model_lib.CMHN(config.model, info, rngs=nnx.Rngs(params=rng))


def _is_pretrained(config) -> bool:
  return any("path" in config.model.encoders[m] for m in config.model.modalities)


def make_optimizer(config) -> optax.GradientTransformation:
  o = config.optimizer
  schedule = optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=float(o.lr), warmup_steps=int(o.warmup_steps),
      decay_steps=max(int(config.num_steps), int(o.warmup_steps) + 1),
      end_value=float(o.lr) * float(o.end_lr_factor))
  # No weight decay on biases, norms, scalars and the memory (kept on the sphere anyway).
  decay_mask = lambda params: jax.tree_util.tree_map_with_path(
      lambda path, x: x.ndim >= 2 and "patterns" not in _path_str(path), params)
  return optax.chain(
      optax.clip_by_global_norm(float(o.clip_norm)),
      optax.adamw(schedule, b1=float(o.b1), b2=float(o.b2), eps=float(o.get("eps", 1e-8)),
                  weight_decay=float(o.weight_decay), mask=decay_mask))


@dataclasses.dataclass
class Setup:
  """Everything the step function and the evaluators need besides the state."""

  graphdef: Any
  mesh: jax.sharding.Mesh
  state_shardings: Any
  batch_sharding: Any
  tx: optax.GradientTransformation
  info: Any
  fingerprint: str
  example_batch: dict | None = None   # shapes of one global batch (for cost analysis)
  train_stats: dict = dataclasses.field(default_factory=dict)
  history: list = dataclasses.field(default_factory=list)
  cache: dict = dataclasses.field(default_factory=dict)  # jitted helpers of the evaluators


def model_fingerprint(config, abstract_params) -> str:
  """A hash of the model config and the parameter shapes: what a checkpoint must match."""
  shapes = jax.tree_util.tree_map(lambda x: [list(x.shape), str(x.dtype)], abstract_params)
  blob = json.dumps({"model": config.model.to_dict(), "params": shapes}, sort_keys=True, default=str)
  return hashlib.sha256(blob.encode()).hexdigest()[:16]


def create_state(config, info, mesh) -> tuple[dict, Setup]:
  """Initial train state, created sharded according to `config.partition_rules`."""
  tx = make_optimizer(config)
  rng = jax.random.PRNGKey(int(config.seed))
  init_rng, state_rng = jax.random.split(rng)

  def init(r):
    model = build_model(config, info, r)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    params, rest = nnx.to_pure_dict(params), nnx.to_pure_dict(rest)
    state = {"params": params, "rest": rest, "opt": tx.init(params),
             "step": jnp.zeros((), jnp.int32), "rng": state_rng}
    # Strong types throughout, so the state a step returns has the signature it was given
    # (a weakly typed leaf would make the second step recompile).
    strong = lambda x: jax.lax.convert_element_type(x, x.dtype) if hasattr(x, "dtype") else x
    return graphdef, jax.tree_util.tree_map(strong, state)

  if _is_pretrained(config):  # weights come from files: build eagerly, then shard
    graphdef, state = init(init_rng)
    abstract = jax.eval_shape(lambda: state)
  else:  # trace once for shapes (and the graphdef), then create the state already sharded
    out = {}

    def init_state(r):
      g, s = init(r)
      out["graphdef"] = g
      return s

    abstract = jax.eval_shape(init_state, init_rng)
    graphdef = out["graphdef"]
    state = None
  specs = partition_specs(abstract, config.partition_rules)
  shardings = jax.tree_util.tree_map(lambda s: jax.sharding.NamedSharding(mesh, s), specs)
  if state is None:
    state = jax.jit(lambda r: init(r)[1], out_shardings=shardings)(init_rng)
  else:
    state = jax.device_put(state, shardings)
  setup = Setup(graphdef=graphdef, mesh=mesh, state_shardings=shardings,
                batch_sharding=jax.sharding.NamedSharding(mesh, P("data")), tx=tx, info=info,
                fingerprint=model_fingerprint(config, abstract["params"]))
  return state, setup


def merge_model(setup: Setup, state) -> model_lib.CMHN:
  return nnx.merge(setup.graphdef, state["params"], state["rest"])


# ----------------------------------------------------------------------------- the step


def loss_fn(params, rest, batch, *, graphdef, config):
  model = nnx.merge(graphdef, params, rest)
  emb = model.embed(batch)
  z, z_mask = model_lib.stack_embeddings(emb, model.modalities, batch)
  valid = batch.get("valid", jnp.ones(z.shape[:1], bool)).astype(bool)
  ctx = losses_lib.LossContext(emb=emb, z=z, z_mask=z_mask, valid=valid, memory=model.memory(),
                               logit_scale=model.logit_scale(), modalities=model.modalities,
                               options=config.loss_options, group=batch.get("group"))
  loss, metrics = losses_lib.total_loss(dict(config.loss), ctx)
  metrics["logit_scale"] = model.logit_scale()
  metrics["beta"] = jnp.asarray(model.memory()["beta"])
  return loss, metrics


def update_fn(state, rng, batch, *, graphdef, tx, config):
  """One optimisation step: `(state, rng, batch) -> (state, metrics)`. Pure."""
  del rng  # fold_in(rng, step) is available to stochastic losses; none uses it yet
  grad_fn = jax.value_and_grad(
      functools.partial(loss_fn, graphdef=graphdef, config=config), has_aux=True)
  accum = int(config.grad_accum_steps)
  if accum <= 1:
    (loss, metrics), grads = grad_fn(state["params"], state["rest"], batch)
  else:
    micro = jax.tree_util.tree_map(lambda x: x.reshape((accum, -1) + x.shape[1:]), batch)

    def body(carry, mb):
      (l, m), g = grad_fn(state["params"], state["rest"], mb)
      return jax.tree_util.tree_map(jnp.add, carry, (l, m, g)), None

    zeros = jax.eval_shape(lambda: grad_fn(state["params"], state["rest"],
                                           jax.tree_util.tree_map(lambda x: x[0], micro)))
    zeros = jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), zeros)
    (loss, metrics, grads), _ = jax.lax.scan(body, (zeros[0][0], zeros[0][1], zeros[1]), micro)
    loss, metrics, grads = jax.tree_util.tree_map(lambda x: x / accum, (loss, metrics, grads))
  updates, opt = tx.update(grads, state["opt"], state["params"])
  params = optax.apply_updates(state["params"], updates)
  grad_norm = optax.global_norm(grads)
  finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
  keep = lambda new, old: jax.tree_util.tree_map(lambda a, b: jnp.where(finite, a, b), new, old)
  new_state = dict(state, params=keep(params, state["params"]), opt=keep(opt, state["opt"]),
                   step=state["step"] + 1)
  metrics = dict(metrics, grad_norm=grad_norm, finite=finite)
  return new_state, metrics


def jit_update(setup: Setup, config):
  step = functools.partial(update_fn, graphdef=setup.graphdef, tx=setup.tx, config=config)
  replicated = jax.sharding.NamedSharding(setup.mesh, P())
  return jax.jit(step, in_shardings=(setup.state_shardings, replicated, setup.batch_sharding),
                 out_shardings=(setup.state_shardings, replicated), donate_argnums=(0,))


# ----------------------------------------------------------------------------- checkpoints


class _DataState:
  """Adapter between a `DataPipeline` and grain's Orbax handler (per-process JSON files).

  The state is captured when the adapter is made, so an async save writes the state of the
  step it belongs to, not of a later one.
  """

  def __init__(self, pipeline, state: bytes | None = None):
    self._pipeline = pipeline
    self._state = state if state is not None else json.dumps(pipeline.get_state()).encode()

  def get_state(self) -> bytes:
    return self._state

  def set_state(self, state: bytes) -> None:
    self._pipeline.set_state(json.loads(state))

  def start_prefetch(self) -> None:
    pass


def checkpoint_manager(workdir: str, config) -> ocp.CheckpointManager:
  import grain.checkpoint  # pylint: disable=g-import-not-at-top  (registers grain's handler)
  del grain
  c = config.checkpoint
  options = ocp.CheckpointManagerOptions(
      max_to_keep=int(c.keep), save_interval_steps=int(c.every),
      enable_async_checkpointing=bool(c.get("async_save", True)), create=True)
  return ocp.CheckpointManager(os.path.join(os.path.abspath(workdir), "checkpoints"),
                               options=options, item_names=("state", "data", "meta"))


def save_checkpoint(mgr, state, pipeline, meta, *, force: bool = False) -> bool:
  import grain.checkpoint as grain_ckpt  # pylint: disable=g-import-not-at-top
  step = int(jax.device_get(state["step"]))
  return mgr.save(step, args=ocp.args.Composite(
      state=ocp.args.StandardSave(state),
      data=grain_ckpt.CheckpointSave(_DataState(pipeline)),
      meta=ocp.args.JsonSave(meta)), force=force)


def restore_checkpoint(mgr, abstract_state, pipeline, fingerprint: str):
  """Restores the latest checkpoint, or returns None when there is none.

  Raises CheckpointMismatchError (and writes nothing) if it was made by another model.
  """
  import grain.checkpoint as grain_ckpt  # pylint: disable=g-import-not-at-top
  step = mgr.latest_step()
  if step is None:
    return None
  meta = mgr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
  if meta.get("fingerprint") != fingerprint:
    raise CheckpointMismatchError(
        f"The checkpoint at step {step} in {mgr.directory} was written by a different model "
        f"(fingerprint {meta.get('fingerprint')} with model config {json.dumps(meta.get('model'))}; "
        f"this config gives {fingerprint}). It is left untouched. Train in a new --workdir, or run "
        f"with the config the checkpoint was made with (its config.json is beside it).")
  restored = mgr.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(abstract_state),
      data=grain_ckpt.CheckpointRestore(_DataState(pipeline, b"{}"))))
  return restored["state"]


# ----------------------------------------------------------------------------- logging


class Progress:
  """Console progress line and TensorBoard scalars (process 0 writes)."""

  def __init__(self, workdir: str, total: int, batch_size: int, start_step: int):
    self.total, self.batch_size = total, batch_size
    self.t0, self.s0 = time.perf_counter(), start_step
    self.last_t, self.last_s = self.t0, start_step
    self.writer = None
    self.history: list[dict] = []
    if jax.process_index() == 0:
      try:
        from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
        self.writer = SummaryWriter(os.path.join(workdir, "events"))
      except ImportError:
        logging.warning("tensorboardX is not installed: no TensorBoard event files.")

  def log(self, step: int, metrics: dict[str, float]) -> None:
    now = time.perf_counter()
    rate = (step - self.last_s) * self.batch_size / max(now - self.last_t, 1e-9)
    done = step - self.s0
    eta = (now - self.t0) / max(done, 1) * (self.total - step)
    self.last_t, self.last_s = now, step
    parts = " ".join(f"{k.split('/')[-1] if k.startswith('loss/') else k}={v:.4f}"
                     for k, v in sorted(metrics.items()) if k == "loss" or k.startswith("loss/"))
    line = (f"step {step}/{self.total} {parts} | {rate:.1f} ex/s | ETA {eta / 60:.1f} min")
    self.history.append(dict(metrics, step=step, examples_per_sec=rate))
    if jax.process_index() == 0:
      print(line, flush=True)
      if self.writer is not None:
        for k, v in metrics.items():
          self.writer.add_scalar(f"train/{k}", v, step)
        self.writer.add_scalar("train/examples_per_sec", rate, step)

  def scalars(self, prefix: str, values: dict[str, float], step: int) -> None:
    if self.writer is not None:
      for k, v in values.items():
        self.writer.add_scalar(f"{prefix}/{k}", v, step)

  def close(self) -> None:
    if self.writer is not None:
      self.writer.close()


class _StopSignal:
  """Turns SIGTERM/SIGINT into a flag checked between steps (main thread only)."""

  def __init__(self):
    self.requested = False
    self._old = {}

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      for sig in (signal.SIGTERM, signal.SIGINT):
        self._old[sig] = signal.signal(sig, self._handle)
    return self

  def _handle(self, signum, frame):
    del frame
    logging.warning("Received signal %d: finishing the current step, then saving.", signum)
    self.requested = True

  def __exit__(self, *exc):
    for sig, old in self._old.items():
      signal.signal(sig, old)


# ----------------------------------------------------------------------------- main loops


def _say(message: str) -> None:
  if jax.process_index() == 0:
    print(message, flush=True)


def _write_config(config, workdir: str) -> None:
  if jax.process_index() == 0:
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "config.json"), "w") as f:
      f.write(config.to_json_best_effort(indent=2, sort_keys=True))


def _kmeans_init(state, setup: Setup, config, pipeline):
  """Re-initialises the memory patterns by spherical k-means over embedded training tuples."""
  n_batches = int(config.model.memory.kmeans_batches)
  model = merge_model(setup, state)
  embed = nnx.jit(lambda m, b: model_lib.stack_embeddings(m.embed(b), m.modalities, b))
  zs = []
  it = iter(pipeline)
  for _ in range(n_batches):
    batch = data_lib.to_global_batch(next(it), setup.mesh)
    z, mask = embed(model, batch)
    zs.append(jnp.where(mask[..., None], z, 0.0))
  z = jnp.concatenate(zs)
  b, m, d = z.shape
  cent = model_lib.kmeans(z.reshape(b, m * d) / np.sqrt(m), int(config.model.memory.num_patterns),
                          rng=jax.random.PRNGKey(int(config.seed) + 1))
  patterns = cent.reshape(-1, m, d)
  params = dict(state["params"])
  params["patterns"] = jax.device_put(patterns, setup.state_shardings["params"]["patterns"])
  return dict(state, params=params)


def train(config, workdir: str) -> tuple[dict, Setup]:
  """Trains to `config.num_steps`, resuming from `workdir`. Returns (state, setup)."""
  from cmhn_jax import fixtures  # pylint: disable=g-import-not-at-top
  losses_lib.check_loss_config(config.loss)
  fixtures.prepare(config)  # runlocal stand-ins (fake data, tiny models), only if missing
  mesh = make_mesh(config.mesh)
  pipeline = data_lib.get_pipeline(config.data, "train", train=True,
                                   global_batch_size=int(config.batch_size), seed=int(config.seed))
  info = pipeline.info
  state, setup = create_state(config, info, mesh)
  mgr = checkpoint_manager(workdir, config)
  meta = {"fingerprint": setup.fingerprint, "model": config.model.to_dict()}
  restored = restore_checkpoint(mgr, jax.eval_shape(lambda: state), pipeline, setup.fingerprint)
  if restored is not None:
    state = restored
    _say(f"Resumed from step {int(state['step'])} in {mgr.directory}.")
  elif config.model.memory.init == "kmeans":
    state = _kmeans_init(state, setup, config, pipeline)  # training then starts a fresh pass
  if int(config.num_steps) == 0 and restored is None:
    raise FileNotFoundError(
        f"Nothing to evaluate: no checkpoint in {mgr.directory}. Train first "
        f"(--mode=train_and_eval), or point --workdir at a trained run.")
  _write_config(config, workdir)
  start = int(jax.device_get(state["step"]))
  total = int(config.num_steps)
  step_fn = jit_update(setup, config)
  rng = jax.random.PRNGKey(int(config.seed))
  progress = Progress(workdir, total, int(config.batch_size), start)
  step_times = []
  it = iter(pipeline)
  step = start
  stopped = False
  try:
    with _StopSignal() as stop, mesh:
      while step < total:
        t0 = time.perf_counter()
        batch = data_lib.to_global_batch(next(it), mesh)
        if setup.example_batch is None:
          setup.example_batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in batch.items()}
        state, metrics = step_fn(state, jax.random.fold_in(rng, step), batch)
        step += 1
        metrics = jax.device_get(metrics)
        if not bool(metrics["finite"]):
          mgr.wait_until_finished()
          raise NonFiniteLossError(
              f"The loss or gradient is not finite at step {step} (loss={float(metrics['loss'])}, "
              f"grad_norm={float(metrics['grad_norm'])}); stopping. The step was not applied, and "
              f"the last good checkpoint ({mgr.latest_step()}) in {mgr.directory} is kept. "
              f"Lower config.optimizer.lr or check the input data.")
        step_times.append(time.perf_counter() - t0)
        if step % int(config.log_every) == 0 or step == total:
          progress.log(step, {k: float(v) for k, v in metrics.items() if k != "finite"})
        # We decide when to save (Orbax's own policy would also save the first step).
        if step % int(config.checkpoint.every) == 0 or step == total or stop.requested:
          save_checkpoint(mgr, state, pipeline, meta, force=True)
        if stop.requested:
          stopped = True
          _say(f"Stopped at step {step} on request; checkpoint saved in {mgr.directory}.")
          break
  finally:
    mgr.wait_until_finished()
    mgr.close()
    pipeline.close()
    progress.close()
  setup.train_stats = _train_stats(step_times, config, setup, state, step_fn, stopped)
  setup.history = progress.history
  return state, setup


def _gemm_flops_per_sec() -> float:
  """This machine's matmul ceiling, measured now: a 2048^3 float32 jnp GEMM."""
  a = jnp.ones((2048, 2048), jnp.float32)
  f = jax.jit(lambda x: x @ x)
  f(a).block_until_ready()
  t0 = time.perf_counter()
  for _ in range(5):
    f(a).block_until_ready()
  return 5 * 2 * 2048**3 / (time.perf_counter() - t0)


def _train_stats(step_times, config, setup, state, step_fn, stopped) -> dict:
  if len(step_times) < 3:
    return {"stopped_early": stopped}
  steady = sorted(step_times[2:])[: max(1, int(0.9 * len(step_times[2:])))]
  sec = float(np.mean(steady))
  stats = {"steps_timed": len(step_times), "sec_per_step": sec,
           "examples_per_sec": int(config.batch_size) / sec, "stopped_early": stopped}
  try:
    # The HLO's own count (no second compile): fwd + bwd of the whole step.
    cost = step_fn.lower(jax.eval_shape(lambda: state), jax.ShapeDtypeStruct((2,), jnp.uint32),
                         setup.example_batch).cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    flops = float(cost.get("flops", 0.0))
    peak = _gemm_flops_per_sec()
    stats.update(model_flops_per_step=flops, gemm_flops_per_sec=peak,
                 mfu=flops / sec / peak if flops else None)
  except Exception as e:  # cost analysis is best effort on some backends
    logging.warning("Could not compute MFU: %s", e)
  return stats


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *, mode: str = "train_and_eval"):
  """Trains (resuming from `workdir`), then evaluates and writes `workdir/report/`."""
  from cmhn_jax import evaluators  # pylint: disable=g-import-not-at-top
  if mode not in ("train", "eval", "train_and_eval"):
    raise ValueError(f"mode={mode!r}; expected 'train', 'eval' or 'train_and_eval'.")
  if mode == "eval":
    config = ml_collections.ConfigDict(config.to_dict())
    config.num_steps = 0
  state, setup = train(config, workdir)
  if mode == "train":
    return {"train": setup.train_stats}
  return evaluators.evaluate_and_report(config, workdir, state, setup)
