"""COCO captions end to end on a small fake tree: raw files and TFDS-prepared."""

import glob
import json
import os
import struct

import numpy as np
import pytest
import tensorflow_datasets as tfds

from cmhn_jax import data
from cmhn_jax.data import coco
from cmhn_jax.data import image as image_lib


@pytest.fixture(scope="module")
def fake_coco(tmp_path_factory):
  root = str(tmp_path_factory.mktemp("coco_raw"))
  return coco.write_fake_coco(root)


def _config(name, tmp_path, **kw):
  cfg = data.default_data_config(name)
  cfg.data_dir = str(tmp_path)
  cfg.image_size = 32
  cfg.vocab_min_count = 1
  for k, v in kw.items():
    cfg[k] = v
  return cfg


def _expected_captions(root):
  """COCO id -> its first five captions by annotation id, from the JSON."""
  caps = {}
  for part in ("train", "val"):
    with open(os.path.join(root, "annotations", f"captions_{part}2014.json")) as f:
      for a in json.load(f)["annotations"]:
        caps.setdefault(a["image_id"], []).append((a["id"], a["caption"]))
  return {k: [c for _, c in sorted(v)][:5] for k, v in caps.items()}


@pytest.fixture(scope="module")
def coco_raw_config(fake_coco, tmp_path_factory):
  cfg = _config("coco_raw", tmp_path_factory.mktemp("prepared"), raw_dir=fake_coco)
  data.prepare(cfg)
  return cfg


def test_raw_builder_and_pipeline_end_to_end(fake_coco, coco_raw_config):
  cfg = coco_raw_config
  # Karpathy splits: train = train + restval; five captions per image.
  sizes = {"train": 8, "validation": 3, "test": 3}
  for split, n_images in sizes.items():
    pipe = data.get_pipeline(cfg, split, train=False, global_batch_size=4)
    assert pipe.info.num_examples == 5 * n_images
    assert pipe.info.modalities == ("image", "text") and pipe.info.num_concepts is None
    batches = list(pipe)
    cat = {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}
    valid = cat["valid"]
    assert valid.sum() == 5 * n_images
    np.testing.assert_array_equal(cat["index"][valid], np.arange(5 * n_images))
    # One example per (image, caption): the 5 captions of an image share `group`.
    np.testing.assert_array_equal(cat["group"][valid], np.arange(5 * n_images) // 5)
    assert (cat["concept"][valid] == -1).all() and not cat["has_audio"].any()
    assert "audio" not in batches[0]
    assert cat["image"].shape[1:] == (32, 32, 3)
  # Text of each example is one of its image's five captions, in order.
  from cmhn_jax.data import sources  # pylint: disable=g-import-not-at-top
  src = sources.open_dataset(cfg).source("test")
  expected = _expected_captions(fake_coco)
  for i in range(len(src)):
    raw = src[i]
    rec_id = int(raw["name"].split("COCO_val2014_")[1].split(".")[0])
    assert raw["text"] == expected[rec_id][i % 5]
  # Images come through: the fake images' mean colours differ between groups.
  pipe = data.get_pipeline(cfg, "test", train=False, global_batch_size=15)
  b = next(iter(pipe))
  means = b["image"].mean((1, 2))
  np.testing.assert_allclose(means[0], means[4], atol=1e-5)
  assert np.abs(means[0] - means[5]).max() > 0.05


def test_raw_train_pipeline_and_vocab(coco_raw_config):
  pipe = data.get_pipeline(coco_raw_config, "train", train=True, global_batch_size=8)
  b = next(iter(pipe))
  assert b["image"].shape == (8, 32, 32, 3) and b["text"].shape == (8, 32)
  assert pipe.info.vocab_size > 10
  assert (b["text_mask"].sum(1) >= 6).all()  # "image N" + at least 4 words


def test_raw_2017_layout(tmp_path):
  root = coco.write_fake_coco(str(tmp_path / "raw"), year="2017")
  cfg = _config("coco_raw", tmp_path / "prepared", raw_dir=root)
  pipe = data.get_pipeline(cfg, "validation", train=False, global_batch_size=5)
  assert pipe.info.num_examples == 15 and len(list(pipe)) == 3


def test_raw_missing_files_are_listed(fake_coco, tmp_path):
  broken = tmp_path / "broken"
  os.makedirs(broken / "annotations")
  os.symlink(os.path.join(fake_coco, "train2014"), broken / "train2014")
  cfg = _config("coco_raw", tmp_path / "prepared", raw_dir=str(broken), builder_config="2014")
  with pytest.raises(FileNotFoundError) as e:
    data.prepare(cfg)
  message = str(e.value)
  for missing in ("captions_train2014.json", "captions_val2014.json", "val2014",
                  "dataset_coco.json"):
    assert missing in message
  assert "train2014\n" not in message
  cfg.raw_dir = str(tmp_path / "no_such_dir")
  with pytest.raises(FileNotFoundError, match="does not exist"):
    data.prepare(cfg)


def _copy_tree(src, dst):
  for path in glob.glob(os.path.join(src, "**", "*"), recursive=True):
    rel = os.path.relpath(path, src)
    if os.path.isdir(path):
      os.makedirs(os.path.join(dst, rel), exist_ok=True)
    else:
      with open(path, "rb") as f:
        content = f.read()
      os.makedirs(os.path.dirname(os.path.join(dst, rel)), exist_ok=True)
      with open(os.path.join(dst, rel), "wb") as f:
        f.write(content)


def test_corrupt_image_is_named(fake_coco, tmp_path):
  root = str(tmp_path / "raw")
  _copy_tree(fake_coco, root)
  victim = sorted(glob.glob(os.path.join(root, "val2014", "*.jpg")))[0]
  with open(victim, "wb") as f:
    f.write(b"this is not a jpeg")
  cfg = _config("coco_raw", tmp_path / "prepared", raw_dir=root)
  with pytest.raises(image_lib.CorruptImageError, match=os.path.basename(victim)):
    data.prepare(cfg)
  # The user's files are untouched.
  with open(victim, "rb") as f:
    assert f.read() == b"this is not a jpeg"


class CocoCaptions(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """The features of TFDS's `coco_captions` (the parts the reader uses)."""

  VERSION = tfds.core.Version("1.1.0")
  BUILDER_CONFIGS = [tfds.core.BuilderConfig(name="2014")]

  def __init__(self, *, raw_dir, **kwargs):
    self._raw_dir = raw_dir
    super().__init__(file_format="array_record", **kwargs)

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
        "image": tfds.features.Image(encoding_format="jpeg"),
        "image/filename": tfds.features.Text(),
        "image/id": np.int64,
        "captions": tfds.features.Sequence({"id": np.int64, "text": tfds.features.Text()}),
    }))

  def _split_generators(self, dl_manager):
    index = coco.read_index(self._raw_dir, "2014")
    return {"train": self._generate_examples(index["train"][:6]),
            "restval": self._generate_examples(index["train"][6:]),
            "val": self._generate_examples(index["validation"]),
            "test": self._generate_examples(index["test"])}

  def _generate_examples(self, items):
    for path, coco_id, texts in items:
      yield coco_id, {"image": path, "image/filename": os.path.basename(path),
                      "image/id": coco_id,
                      "captions": [{"id": k, "text": t} for k, t in enumerate(texts)]}


def _masked_crc32c(data_bytes):
  crc = 0xFFFFFFFF
  for byte in data_bytes:
    crc ^= byte
    for _ in range(8):
      crc = (crc >> 1) ^ (0x82F63B78 & -(crc & 1))
  crc ^= 0xFFFFFFFF
  return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _to_tfrecord(version_dir):
  """Rewrites a prepared array_record TFDS dir as TFRecord, as `tfds build` does."""
  from array_record.python import array_record_module  # pylint: disable=g-import-not-at-top
  for path in glob.glob(os.path.join(version_dir, "*.array_record-*")):
    reader = array_record_module.ArrayRecordReader(path)
    records = reader.read_all()
    reader.close()
    with open(path.replace(".array_record-", ".tfrecord-"), "wb") as f:
      for r in records:
        header = struct.pack("<Q", len(r))
        f.write(header + struct.pack("<I", _masked_crc32c(header)) + r
                + struct.pack("<I", _masked_crc32c(r)))
    os.remove(path)
  info_path = os.path.join(version_dir, "dataset_info.json")
  with open(info_path) as f:
    info = json.load(f)
  info["fileFormat"] = "tfrecord"
  with open(info_path, "w") as f:
    json.dump(info, f)


@pytest.mark.parametrize("file_format", ["array_record", "tfrecord"])
def test_tfds_prepared_coco_captions(fake_coco, tmp_path, file_format):
  builder = CocoCaptions(raw_dir=fake_coco, data_dir=str(tmp_path))
  builder.download_and_prepare()
  if file_format == "tfrecord":
    _to_tfrecord(builder.data_dir)
  cfg = _config("coco", tmp_path)
  expected = _expected_captions(fake_coco)
  pipe = data.get_pipeline(cfg, "train", train=False, global_batch_size=10)
  assert pipe.info.num_examples == 40  # train (6) + restval (2) images x 5
  batches = list(pipe)
  assert sum(b["valid"].sum() for b in batches) == 40
  from cmhn_jax.data import sources  # pylint: disable=g-import-not-at-top
  ds = sources.open_dataset(cfg)
  assert ds.splits() == ("restval", "test", "train", "val", "validation")
  src = ds.source("test")
  assert len(src) == 15
  for i in range(0, 15, 4):
    raw = src[i]
    coco_id = int(raw["name"].split("_")[-1].split(".")[0].rstrip(")"))
    assert raw["text"] == expected[coco_id][i % 5]
    assert isinstance(raw["image"], bytes) and raw["image"][:2] == b"\xff\xd8"
  train = data.get_pipeline(cfg, "train", train=True, global_batch_size=4)
  assert next(iter(train))["image"].shape == (4, 32, 32, 3)
