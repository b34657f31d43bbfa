"""Sharded equals unsharded: 8 simulated devices (data x memory mesh) and 2 local hosts."""

import os
import subprocess
import sys

import numpy as np
import portpicker
import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
WORKER = os.path.join(HERE, "_sharding_worker.py")


def _run(args, devices, cache_dir, timeout=600, wait=True):
  env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
             JAX_COMPILATION_CACHE_DIR=str(cache_dir), JAX_PLATFORMS="cpu")
  proc = subprocess.Popen([sys.executable, WORKER] + [str(a) for a in args], env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  if not wait:
    return proc
  out, _ = proc.communicate(timeout=timeout)
  assert proc.returncode == 0, out[-4000:]
  return out


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
  return tmp_path_factory.mktemp("xla_cache_sharding")


def test_training_on_a_data_x_memory_mesh_equals_one_device(shapes_tiny_config, tmp_path, cache_dir):
  data_dir = shapes_tiny_config.data_dir
  _run(["train", data_dir, tmp_path / "one.npz", 1, 1], 1, cache_dir)
  _run(["train", data_dir, tmp_path / "mesh.npz", 4, 2], 8, cache_dir)
  one, mesh = np.load(tmp_path / "one.npz"), np.load(tmp_path / "mesh.npz")
  assert int(mesh["devices"]) == 8 and "memory" in str(mesh["patterns_spec"])
  params = [k for k in one.files if k not in ("patterns_spec", "devices")]
  assert len(params) > 10
  for k in params:
    np.testing.assert_allclose(mesh[k], one[k], rtol=2e-4, atol=2e-5, err_msg=k)


def test_retrieval_with_patterns_sharded_over_memory_equals_replicated(tmp_path, cache_dir):
  _run(["retrieve", tmp_path / "r.npz"], 8, cache_dir)
  r = np.load(tmp_path / "r.npz")
  for k in r.files:
    if k.endswith("_sharded"):
      np.testing.assert_allclose(r[k], r[k.replace("_sharded", "_single")], rtol=1e-5, atol=1e-6,
                                 err_msg=k)


def test_two_local_hosts_train_in_lockstep(shapes_tiny_config, tmp_path, cache_dir):
  port = portpicker.pick_unused_port()
  prefix = str(tmp_path / "host")
  procs = [_run(["multihost", shapes_tiny_config.data_dir, prefix, i, 2, port], 1, cache_dir, wait=False)
           for i in range(2)]
  outs = [p.communicate(timeout=600)[0] for p in procs]
  for p, out in zip(procs, outs):
    assert p.returncode == 0, out[-4000:]
  a, b = np.load(prefix + "0.npz"), np.load(prefix + "1.npz")
  assert int(a["devices"]) == 2
  for k in a.files:
    if k not in ("patterns_spec", "devices"):
      np.testing.assert_array_equal(a[k], b[k], err_msg=k)
  # One checkpoint, with one data-iterator state per process.
  data_dir = os.path.join(prefix + "workdir", "checkpoints", "3", "data")
  states = sorted(f for f in os.listdir(data_dir) if f.endswith(".json"))
  assert states == ["process_0-of-2.json", "process_1-of-2.json"]
