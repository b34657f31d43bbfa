"""Run in a subprocess by sharding_test.py (XLA_FLAGS decides the device count there).

  python tests/_sharding_worker.py train DATA_DIR OUT.npz DATA MEMORY
  python tests/_sharding_worker.py retrieve OUT.npz
  python tests/_sharding_worker.py multihost DATA_DIR OUT_PREFIX PROCESS_ID NUM_PROCESSES PORT
"""

import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def _data_config(data_dir):
  from cmhn_jax import data  # pylint: disable=g-import-not-at-top
  cfg = data.default_data_config("shapes")
  cfg.builder_config = "tiny"
  cfg.data_dir = data_dir
  cfg.prepare_workers = 0
  return cfg


def _flat(tree):
  leaves = jax.tree_util.tree_flatten_with_path(jax.device_get(tree))[0]
  return {jax.tree_util.keystr(p): np.asarray(v) for p, v in leaves}


def train(data_dir, out, data_axis, memory_axis, workdir=None):
  import tempfile  # pylint: disable=g-import-not-at-top
  from cmhn_jax import train as train_lib  # pylint: disable=g-import-not-at-top
  from train_test import tiny_config  # pylint: disable=g-import-not-at-top
  config = tiny_config(_data_config(data_dir), num_steps=3)
  config.mesh.data, config.mesh.memory = int(data_axis), int(memory_axis)
  state, setup = train_lib.train(config, workdir or tempfile.mkdtemp())
  spec = setup.state_shardings["params"]["patterns"].spec
  np.savez(out, patterns_spec=str(spec), devices=jax.device_count(), **_flat(state["params"]))


def retrieve(out):
  from cmhn_jax import retrieval  # pylint: disable=g-import-not-at-top
  mesh = jax.make_mesh((4, 2), ("data", "memory"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
  p = jax.random.normal(jax.random.PRNGKey(0), (64, 3, 8))
  cue = p[:8] + 0.3 * jax.random.normal(jax.random.PRNGKey(1), (8, 3, 8))
  mask = jnp.zeros((8, 3), bool).at[:, 0].set(True)
  named = lambda *s: jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(*s))
  results = {}
  for chunk in (None, 16):
    f = jax.jit(lambda c, p_, chunk=chunk: retrieval.retrieve(c, p_, cue_mask=mask, beta=4.0,
                                                             chunk_size=chunk, max_steps=4))
    single = f(cue, p)
    sharded = f(jax.device_put(cue, named("data")), jax.device_put(p, named("memory")))
    for k in ("state", "attention", "energies"):
      results[f"{k}_{chunk}_single"] = np.asarray(getattr(single, k))
      results[f"{k}_{chunk}_sharded"] = np.asarray(getattr(sharded, k))
  np.savez(out, **results)


def multihost(data_dir, prefix, process_id, num_processes, port):
  jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}",
                             num_processes=int(num_processes), process_id=int(process_id))
  train(data_dir, f"{prefix}{process_id}.npz", -1, 1, workdir=f"{prefix}workdir")


if __name__ == "__main__":
  {"train": train, "retrieve": retrieve, "multihost": multihost}[sys.argv[1]](*sys.argv[2:])
