"""Bring your own data: manifests of image / text / audio rows."""

import csv
import json
import os

import numpy as np
from PIL import Image
import pytest

from cmhn_jax import data
from cmhn_jax.data import audio
from cmhn_jax.data import image as image_lib
from cmhn_jax.data import pipeline
from cmhn_jax.data import sources


def _write_files(root):
  """Three images and three tones (different pitches, 8 kHz: resampled)."""
  os.makedirs(os.path.join(root, "media"), exist_ok=True)
  for i, colour in enumerate([(255, 0, 0), (0, 255, 0), (0, 0, 255)]):
    Image.new("RGB", (40, 30), colour).save(os.path.join(root, "media", f"img{i}.png"))
    t = np.arange(8000 * (i + 1)) / 8000  # 1, 2 and 3 seconds
    audio.write_wav(os.path.join(root, "media", f"tone{i}.wav"),
                    0.5 * np.sin(2 * np.pi * 220 * (i + 1) * t), 8000)


ROWS = [
    {"image": "media/img0.png", "text": "a red thing", "audio": "media/tone0.wav"},
    {"image": "media/img1.png", "text": "a green thing"},  # no audio
    {"audio": "media/tone1.wav", "text": "a low hum", "group": "hum"},  # LibriSpeech-like
    {"audio": "media/tone1.wav", "text": "the same hum again", "group": "hum"},
    {"image": "media/img2.png"},  # image only
    {"audio": "media/tone2.wav", "text": "a long tone", "split": "test"},
]


@pytest.fixture(scope="module", params=["jsonl", "csv"])
def manifest_config(request, tmp_path_factory):
  root = str(tmp_path_factory.mktemp("byod"))
  _write_files(root)
  path = os.path.join(root, f"rows.{request.param}")
  if request.param == "jsonl":
    with open(path, "w") as f:
      for r in ROWS:
        f.write(json.dumps(r) + "\n")
  else:
    with open(path, "w", newline="") as f:
      w = csv.DictWriter(f, fieldnames=["image", "text", "audio", "group", "split"])
      w.writeheader()
      w.writerows(ROWS)
  cfg = data.default_data_config("manifest")
  cfg.manifest_path = path
  cfg.data_dir = os.path.join(root, "prepared")
  cfg.image_size = 16
  cfg.max_audio_seconds = 2.0
  data.prepare(cfg)
  return cfg


def test_manifest_end_to_end(manifest_config):
  pipe = data.get_pipeline(manifest_config, "train", train=False, global_batch_size=5)
  info = pipe.info
  assert info.modalities == ("image", "text", "audio") and info.num_examples == 5
  batches = list(pipe)
  assert len(batches) == 1
  b = batches[0]
  np.testing.assert_array_equal(b["has_image"], [1, 1, 0, 0, 1])
  np.testing.assert_array_equal(b["has_text"], [1, 1, 1, 1, 0])
  np.testing.assert_array_equal(b["has_audio"], [1, 0, 1, 1, 0])
  # Missing modalities are zero-filled.
  assert not b["image"][2].any() and not b["audio_mask"][1].any() and not b["text_mask"][4].any()
  # Rows 2 and 3 share their group; the others are their own.
  assert b["group"][2] == b["group"][3] and len(set(b["group"].tolist())) == 4
  # Pixels: row 0 is red, row 1 green (CLIP-normalised, so compare channels).
  assert b["image"][0, ..., 0].mean() > b["image"][0, ..., 1].mean()
  assert b["image"][1, ..., 1].mean() > b["image"][1, ..., 0].mean()
  # Audio: 1 s and 2 s tones at 16 kHz; max_audio_seconds=2 keeps 99 frames.
  frames = b["audio_mask"].sum(1)
  assert frames[0] == 50 and frames[2] == info.audio_frames == 99
  tok = sources.open_dataset(manifest_config)
  assert "hum" in tok.vocabulary()
  test = data.get_pipeline(manifest_config, "test", train=True, global_batch_size=1)
  long_tone = next(iter(test))
  assert long_tone["audio_mask"].all()  # 3 s cropped to 2 s


def test_redraw_is_refused_for_data_it_cannot_redraw(manifest_config):
  cfg = manifest_config.copy_and_resolve_references()
  cfg.train_augment = "redraw"
  with pytest.raises(ValueError, match="only the `shapes` dataset"):
    data.get_pipeline(cfg, "train", train=True, global_batch_size=2)


def test_changed_manifest_is_refused_not_rebuilt(manifest_config, tmp_path):
  cfg = manifest_config.copy_and_resolve_references()
  with open(cfg.manifest_path) as f:
    original = f.read()
  prepared = sorted(os.listdir(cfg.data_dir))
  try:
    with open(cfg.manifest_path, "a") as f:
      f.write('{"text": "one more row"}\n' if cfg.manifest_path.endswith("jsonl")
              else ",one more row,,,\n")
    with pytest.raises(ValueError, match="changed since it was prepared"):
      data.get_pipeline(cfg, "train", train=True, global_batch_size=2)
    assert sorted(os.listdir(cfg.data_dir)) == prepared
  finally:
    with open(cfg.manifest_path, "w") as f:
      f.write(original)


@pytest.mark.parametrize("row, message", [
    ({"text": "x", "colour": "red"}, "unknown fields"),
    ({"group": "g"}, "none of image, text, audio"),
    ({"image": "missing.png"}, "missing.png does not exist"),
])
def test_bad_rows_name_the_line(tmp_path, row, message):
  path = tmp_path / "bad.jsonl"
  path.write_text(json.dumps({"text": "fine"}) + "\n" + json.dumps(row) + "\n")
  cfg = data.default_data_config("manifest")
  cfg.manifest_path = str(path)
  cfg.data_dir = str(tmp_path / "prepared")
  with pytest.raises((ValueError, FileNotFoundError), match=f"bad.jsonl:2: .*{message}"):
    data.prepare(cfg)
  assert not os.path.exists(os.path.join(cfg.data_dir, "cmhn_manifest", "bad"))


def test_corrupt_image_names_the_file_or_record(tmp_path):
  """A cut-short image fails when preparing, naming the file; one that fails
  later, in the pipeline, names the record."""
  img = tmp_path / "cut.jpg"
  Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), np.uint8)).save(img)
  whole = img.read_bytes()
  img.write_bytes(whole[:400])
  path = tmp_path / "rows.jsonl"
  path.write_text(json.dumps({"image": "cut.jpg", "text": "broken"}) + "\n")
  cfg = data.default_data_config("manifest")
  cfg.manifest_path = str(path)
  cfg.data_dir = str(tmp_path / "prepared")
  with pytest.raises(image_lib.CorruptImageError, match=r"cut\.jpg"):
    data.prepare(cfg)
  assert img.read_bytes() == whole[:400]  # the user's file is left alone
  pre = pipeline.Preprocessor(cfg, ("image",), None, train=False)
  raw = {"image": whole[:400], "name": "manifest/train row 7 (line 8, cut.jpg)",
         "concept": -1, "group": 7, "index": 7, "instance": 7}
  with pytest.raises(image_lib.CorruptImageError, match=r"row 7 \(line 8, cut\.jpg\)"):
    pre(raw)

