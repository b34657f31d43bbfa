"""Shared fixtures."""

import pytest


@pytest.fixture(scope="session")
def shapes_tiny_config(tmp_path_factory):
  """Data config of the `shapes` 'tiny' variant, prepared once per session in a
  temporary data_dir (a few seconds). Copy it before changing keys."""
  from cmhn_jax import data  # pylint: disable=g-import-not-at-top
  cfg = data.default_data_config("shapes")
  cfg.builder_config = "tiny"
  cfg.data_dir = str(tmp_path_factory.mktemp("cmhn_data"))
  cfg.prepare_workers = 0
  data.prepare(cfg)
  return cfg


@pytest.fixture(scope="session", autouse=True)
def _compilation_cache(tmp_path_factory):
  """A persistent XLA compilation cache for the session: a run resumed in a test, or a second
  run of the same config, reuses the first run's executables instead of compiling again."""
  import jax  # pylint: disable=g-import-not-at-top
  jax.config.update("jax_compilation_cache_dir", str(tmp_path_factory.mktemp("xla_cache")))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
  yield
