"""The grain pipeline: batch contract, resumption, sharding, eval padding."""

import json

import jax
import numpy as np
import pytest

from cmhn_jax import data


def _take(iterator, n):
  return [next(iterator) for _ in range(n)]


def _assert_batches_equal(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x.keys() == y.keys()
    for k in x:
      np.testing.assert_array_equal(x[k], y[k], err_msg=k)


def test_batch_contract(shapes_tiny_config):
  pipe = data.get_pipeline(shapes_tiny_config, "train", train=True, global_batch_size=8)
  info = pipe.info
  assert info.modalities == ("image", "text", "audio")
  assert info.num_examples == 64 and info.num_concepts == 64 and info.num_batches is None
  batch = next(iter(pipe))
  b = 8
  expected = {
      "image": ((b, info.image_size, info.image_size, 3), np.float32),
      "text": ((b, info.max_text_len), np.int32),
      "text_mask": ((b, info.max_text_len), np.bool_),
      "audio": ((b, info.audio_frames, info.n_mels), np.float32),
      "audio_mask": ((b, info.audio_frames), np.bool_),
  }
  for k in ("has_image", "has_text", "has_audio", "valid"):
    expected[k] = ((b,), np.bool_)
  for k in ("concept", "group", "index", "instance"):
    expected[k] = ((b,), np.int32)
  assert {k: (v.shape, v.dtype) for k, v in batch.items()} == expected
  assert batch["valid"].all() and batch["has_audio"].all()
  np.testing.assert_array_equal(batch["group"], batch["concept"])
  assert ((batch["text"] < info.vocab_size) & (batch["text"] >= 0)).all()
  np.testing.assert_array_equal(batch["text_mask"], batch["text"] != info.pad_id)
  # Audio frames past the end of speech are masked; there is some speech.
  assert batch["audio_mask"].any(1).all() and not batch["audio_mask"].all()
  assert np.isfinite(batch["audio"]).all() and np.isfinite(batch["image"]).all()
  assert abs(batch["image"].mean()) < 1.0


def test_waveform_feature(shapes_tiny_config):
  cfg = shapes_tiny_config.copy_and_resolve_references()
  cfg.audio_feature = "waveform"
  pipe = data.get_pipeline(cfg, "validation", train=False, global_batch_size=4)
  batch = next(iter(pipe))
  assert pipe.info.audio_frames == pipe.info.audio_samples == 48000
  assert batch["audio"].shape == (4, 48000) and batch["audio_mask"].shape == (4, 48000)
  lengths = batch["audio_mask"].sum(1)
  for row, n in zip(batch["audio"], lengths):
    assert np.abs(row[:n]).max() > 0.1 and not row[n:].any()


def test_resume_equals_uninterrupted(shapes_tiny_config):
  """Batches after restoring a saved state (JSON round trip, fresh pipeline)
  equal those an uninterrupted iteration yields, across epoch boundaries."""
  kwargs = dict(train=True, global_batch_size=16, seed=3)
  straight = _take(iter(data.get_pipeline(shapes_tiny_config, "train", **kwargs)), 12)
  pipe = data.get_pipeline(shapes_tiny_config, "train", **kwargs)
  it = iter(pipe)
  first = _take(it, 5)
  state = json.loads(json.dumps(pipe.get_state()))
  _take(it, 2)  # run on past the checkpoint, then "crash"
  resumed = data.get_pipeline(shapes_tiny_config, "train", **kwargs)
  resumed.set_state(state)
  _assert_batches_equal(first + _take(iter(resumed), 7), straight)
  # Epochs are reshuffled, each one a permutation of the split.
  epoch = lambda i: np.sort(np.concatenate([b["index"] for b in straight[4 * i:4 * i + 4]]))
  np.testing.assert_array_equal(epoch(0), np.arange(64))
  np.testing.assert_array_equal(epoch(1), np.arange(64))
  assert not np.array_equal(straight[0]["index"], straight[4]["index"])


def test_workers_same_batches_and_resume(shapes_tiny_config):
  """Two worker processes give the batches of zero, and resume the same way."""
  kwargs = dict(train=True, global_batch_size=8, seed=1)
  reference = _take(iter(data.get_pipeline(shapes_tiny_config, "train", **kwargs)), 6)
  cfg = shapes_tiny_config.copy_and_resolve_references()
  cfg.num_workers = 2
  cfg.cache = False  # (a cached pipeline has no workers)
  pipe = data.get_pipeline(cfg, "train", **kwargs)
  try:
    it = iter(pipe)
    got = _take(it, 3)
    state = json.loads(json.dumps(pipe.get_state()))
    pipe.set_state(state)
    got += _take(it, 3)
  finally:
    pipe.close()
  _assert_batches_equal(got, reference)


@pytest.mark.parametrize("train", [True, False])
def test_cache_gives_the_same_batches(shapes_tiny_config, train):
  kwargs = dict(train=train, global_batch_size=12, seed=2, num_epochs=2, drop_remainder=False)
  batches = {}
  for cache in (True, False):
    cfg = shapes_tiny_config.copy_and_resolve_references()
    cfg.cache = cache
    batches[cache] = list(data.get_pipeline(cfg, "validation", **kwargs))
  _assert_batches_equal(batches[True], batches[False])
  assert batches[True][-1]["valid"].sum() < 12  # padding included


def test_redraw_augments_training_images_only(shapes_tiny_config):
  """Training batches of `shapes` carry redrawn images (not the stored ones), the same for a
  given seed, different for another; eval batches keep the stored images."""
  kwargs = dict(global_batch_size=64, seed=0, num_epochs=1)
  evals = next(iter(data.get_pipeline(shapes_tiny_config, "train", train=False, **kwargs)))
  stored = {int(i): img for i, img in zip(evals["index"], evals["image"])}
  first = next(iter(data.get_pipeline(shapes_tiny_config, "train", train=True, **kwargs)))
  again = next(iter(data.get_pipeline(shapes_tiny_config, "train", train=True, **kwargs)))
  assert "redraw" not in first
  np.testing.assert_array_equal(first["image"], again["image"])
  assert all(not np.array_equal(img, stored[int(i)]) for i, img in zip(first["index"], first["image"]))
  # Each redraw is an image like the stored ones (same normalisation and range).
  np.testing.assert_allclose(first["image"].mean(), evals["image"].mean(), atol=0.1)
  cfg = shapes_tiny_config.copy_and_resolve_references()
  cfg.train_augment = "none"
  plain = next(iter(data.get_pipeline(cfg, "train", train=True, **kwargs)))
  np.testing.assert_array_equal(plain["index"], first["index"])  # augmenting keeps the order
  assert all(np.array_equal(img, stored[int(i)]) for i, img in zip(plain["index"], plain["image"]))


def test_redraw_in_worker_processes_gives_the_same_batches(shapes_tiny_config):
  """With the cache, `num_workers` processes redraw the images: the same images, in order."""
  batches = {}
  for workers in (0, 2):
    cfg = shapes_tiny_config.copy_and_resolve_references()
    cfg.cache, cfg.num_workers = True, workers
    pipe = data.get_pipeline(cfg, "train", train=True, global_batch_size=24, seed=3)
    it = iter(pipe)
    batches[workers] = [next(it) for _ in range(3)]
    pipe.close()
  for a, b in zip(batches[0], batches[2]):
    for k in a:
      np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_seed_changes_order(shapes_tiny_config):
  a = next(iter(data.get_pipeline(shapes_tiny_config, "train", train=True, global_batch_size=8, seed=0)))
  b = next(iter(data.get_pipeline(shapes_tiny_config, "train", train=True, global_batch_size=8, seed=1)))
  assert not np.array_equal(a["index"], b["index"])


@pytest.mark.parametrize("shard_count", [1, 3])
def test_eval_keeps_every_example_once(shapes_tiny_config, shard_count):
  """Eval shards cover the split exactly once, padded to equal batch counts."""
  seen, counts = [], set()
  for shard in range(shard_count):
    pipe = data.get_pipeline(shapes_tiny_config, "test", train=False,
                             global_batch_size=5 * shard_count,
                             shard_index=shard, shard_count=shard_count)
    batches = list(pipe)
    counts.add(len(batches))
    assert len(batches) == pipe.info.num_batches == len(pipe)
    for b in batches:
      assert b["index"].shape == (5,)
      seen += b["index"][b["valid"]].tolist()
      pad = ~b["valid"]
      assert (b["index"][pad] == -1).all() and not b["has_image"][pad].any()
      assert not b["image"][pad].any()
  assert len(counts) == 1
  assert sorted(seen) == list(range(32))
  # Eval is deterministic: the same pass twice.
  pipe = data.get_pipeline(shapes_tiny_config, "test", train=False, global_batch_size=8)
  _assert_batches_equal(list(pipe), list(pipe))


def test_train_shards_are_disjoint(shapes_tiny_config):
  per_shard = []
  for shard in range(2):
    pipe = data.get_pipeline(shapes_tiny_config, "train", train=True, global_batch_size=8,
                             shard_index=shard, shard_count=2, num_epochs=1)
    assert pipe.info.local_batch_size == 4 and pipe.info.num_batches == 8
    per_shard.append(np.concatenate([b["index"] for b in pipe]))
  assert not set(per_shard[0]) & set(per_shard[1])
  assert sorted(np.concatenate(per_shard)) == list(range(64))


def test_finite_train_without_drop_remainder_pads(shapes_tiny_config):
  pipe = data.get_pipeline(shapes_tiny_config, "train", train=True, global_batch_size=24,
                           num_epochs=1, drop_remainder=False)
  batches = list(pipe)
  assert len(batches) == 3
  valid = np.concatenate([b["valid"] for b in batches])
  assert valid.sum() == 64 and not valid[-8:].any()


def test_to_global_batch(shapes_tiny_config):
  batch = next(iter(data.get_pipeline(shapes_tiny_config, "train", train=True, global_batch_size=4)))
  mesh = jax.make_mesh((1, 1), ("data", "memory"))
  out = data.to_global_batch(batch, mesh)
  assert out.keys() == batch.keys()
  for k, v in out.items():
    assert isinstance(v, jax.Array) and v.shape == batch[k].shape
    assert v.sharding.spec == jax.sharding.PartitionSpec("data")
    np.testing.assert_array_equal(np.asarray(v), batch[k])


def test_default_config_has_every_key():
  for name in data.DATASETS:
    cfg = data.default_data_config(name)
    for key in ("name", "data_dir", "builder_config", "image_size", "image_mean", "image_std",
                "text_max_len", "tokenizer", "audio_feature", "sample_rate", "n_mels",
                "hop_length", "win_length", "max_audio_seconds", "num_workers", "prefetch",
                "raw_dir", "manifest_path"):
      assert key in cfg, (name, key)


def test_bad_names_list_the_choices(shapes_tiny_config):
  with pytest.raises(ValueError, match="available: .*'shapes'.*'coco'"):
    data.default_data_config("imagenet")
  cfg = shapes_tiny_config.copy_and_resolve_references()
  cfg.name = "imagenet"
  with pytest.raises(ValueError, match="available:.*'manifest'"):
    data.get_pipeline(cfg, "train", train=True, global_batch_size=4)
  with pytest.raises(ValueError, match=r"available: \['train', 'validation', 'test'\]"):
    data.get_pipeline(shapes_tiny_config, "val", train=False, global_batch_size=4)
  with pytest.raises(ValueError, match="does not divide"):
    data.get_pipeline(shapes_tiny_config, "train", train=True, global_batch_size=5, shard_count=2, shard_index=0)


def test_missing_data_says_how_to_prepare(tmp_path):
  cfg = data.default_data_config("shapes")
  cfg.builder_config = "tiny"
  cfg.data_dir = str(tmp_path / "nothing_here")
  cfg.auto_prepare = False
  with pytest.raises(FileNotFoundError, match="python -m cmhn_jax.data"):
    data.get_pipeline(cfg, "train", train=True, global_batch_size=4)
  cfg = data.default_data_config("coco")
  cfg.data_dir = str(tmp_path)
  with pytest.raises(FileNotFoundError, match="coco_raw"):
    data.prepare(cfg)
