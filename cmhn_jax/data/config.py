"""`default_data_config(name)`: every data key with its default."""

from __future__ import annotations

import os

import ml_collections

from cmhn_jax.data import image as image_lib
from cmhn_jax.data import sources


def default_data_dir() -> str:
  """`$CMHN_DATA_DIR`, else ~/tensorflow_datasets (TFDS's own default)."""
  return os.path.expanduser(
      os.environ.get("CMHN_DATA_DIR") or os.path.join("~", "tensorflow_datasets"))


def default_data_config(name: str = "shapes") -> ml_collections.ConfigDict:
  """All data keys with defaults for dataset `name` (configs/*.py start here).

  Keys:
    name: 'shapes' | 'coco' (TFDS-prepared coco_captions) | 'coco_raw' (raw
      COCO files) | 'manifest' (JSONL/CSV) | 'tfds' (any TFDS-prepared dir).
    data_dir: where prepared datasets live.
    builder_config: shapes: 'tiny' | 'default'; coco_raw: '2014' | '2017'
      ('' = detect); coco/tfds: the TFDS config ('' = any); manifest: the name
      the prepared copy gets ('' = the manifest's file name).
    auto_prepare: prepare on first use if missing (else raise, saying how).
    prepare_workers: processes generating `shapes` (output is the same for any
      number).
    shapes_seed, shapes_image_size: generate a `shapes` variant (None: the
      builder config's own; a changed value gets its own directory).
    raw_dir, karpathy_json: coco_raw inputs. manifest_path: manifest input.
    tfds_name, tfds_dir: which prepared TFDS dataset ('coco', 'tfds');
      image_key, text_key, audio_key, name_key, text_is_list: its features
      ('tfds' only; nested keys as 'captions/text').
    captions_per_image: texts kept per record (COCO: 5, one example each).
    image_size, image_mean, image_std: output image side and normalisation.
    train_augment: 'none' | 'random_resized_crop' (crop_scale: its area
      range) | 'redraw' (shapes only: each training image is drawn afresh with
      what its caption states kept and the rest -- rotation, texture, noise,
      jitter -- resampled; see `shapes.redraw_image`).
    text_max_len, tokenizer ('word' or a local Hugging Face tokenizer
      directory), vocab_min_count, vocab_max_size (0: no limit).
    audio_feature: 'logmel' | 'waveform'; sample_rate, n_mels, win_length,
      hop_length (samples), max_audio_seconds (clips are cropped or padded).
    cache: preprocess the split once (as for eval) and serve batches from
      memory: True, False, or None = auto (shapes without augmentation, when
      it fits in cache_max_mb). Cached training has no per-example randomness
      beyond the shuffle and `redraw`; its num_workers processes do the
      redrawing, if any.
    num_workers: grain worker processes (0: in the main process);
      read_threads: threads per process; prefetch: batches buffered ahead.
  """
  if name not in sources.DATASETS:
    raise ValueError(f"Unknown dataset {name!r}; available: {list(sources.DATASETS)}.")
  is_shapes = name == "shapes"
  photos = name in ("coco", "coco_raw", "tfds")
  c = ml_collections.ConfigDict()
  c.name = name
  c.data_dir = default_data_dir()
  c.builder_config = "default" if is_shapes else ""
  c.auto_prepare = True
  c.prepare_workers = min(4, os.cpu_count() or 1)
  c.shapes_seed = ml_collections.config_dict.placeholder(int)
  c.shapes_image_size = ml_collections.config_dict.placeholder(int)
  c.raw_dir = ""
  c.karpathy_json = ""
  c.manifest_path = ""
  c.tfds_name = "coco_captions" if name == "coco" else ""
  c.tfds_dir = ""
  c.image_key = "image" if name == "tfds" else ""
  c.text_key = ""
  c.audio_key = ""
  c.name_key = ""
  c.text_is_list = False
  c.captions_per_image = 5
  # Image.
  c.image_size = 224 if photos else 64
  c.image_mean = image_lib.CLIP_MEAN if photos else (0.5, 0.5, 0.5)
  c.image_std = image_lib.CLIP_STD if photos else (0.5, 0.5, 0.5)
  # Crops and flips would move the shape and change its position word; shapes
  # redraws instead (a fresh image of the same caption).
  c.train_augment = "redraw" if is_shapes else "random_resized_crop"
  c.crop_scale = (0.5, 1.0)
  # Text.
  c.text_max_len = 16 if is_shapes else 32
  c.tokenizer = "word"
  c.vocab_min_count = 5 if photos else 1
  c.vocab_max_size = 0
  # Audio.
  c.audio_feature = "logmel"
  c.sample_rate = 16000
  c.n_mels = 40
  c.win_length = 400  # 25 ms
  c.hop_length = 320  # 20 ms
  c.max_audio_seconds = 3.0 if is_shapes else 10.0
  # Pipeline.
  c.cache = ml_collections.config_dict.placeholder(bool)
  c.cache_max_mb = 2048
  c.num_workers = 0
  c.read_threads = 2
  c.prefetch = 2
  return c
