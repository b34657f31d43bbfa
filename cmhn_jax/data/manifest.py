"""Bring your own data: a JSONL or CSV manifest prepared into TFDS format.

Each row names any non-empty subset of

    image   path of an image file (JPEG, PNG, ...)
    text    a caption or transcript
    audio   path of an audio file (WAV; FLAC/OGG/MP3 with `soundfile`)

plus optional `group` (rows sharing it are relevant to each other, e.g. the five
captions of one Clotho clip; default: the row itself) and `split` (default
`train`). Relative paths are relative to the manifest's folder. Examples:

    {"audio": "LibriSpeech/dev-clean/84/121123/84-121123-0000.flac", "text": "GO DO YOU HEAR"}
    {"image": "cc/000001.jpg", "text": "a dog on a beach", "split": "validation"}

    image,text,audio,group,split        (CSV: a header row, then one row per example)

Preparing copies the image bytes as they are, decodes audio and stores it as
16-bit PCM at the configured sample rate, and records the manifest's SHA-256:
a manifest that changed after preparing is refused, never silently rebuilt.
"""

from __future__ import annotations

import collections
import csv
import dataclasses
import hashlib
import json
import os

import numpy as np
import tensorflow_datasets as tfds

from cmhn_jax.data import audio as audio_lib
from cmhn_jax.data import image as image_lib
from cmhn_jax.data import text as text_lib
from cmhn_jax.data import tfds_base

FIELDS = ("image", "text", "audio", "group", "split")


def file_sha256(path: str) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      h.update(block)
  return h.hexdigest()


def read_manifest(path: str) -> list[dict]:
  """Rows of a .jsonl/.json-lines or .csv manifest, validated, paths resolved."""
  path = os.path.expanduser(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(
        f"Manifest {path!r} does not exist. A manifest is a JSONL or CSV file "
        "whose rows name `image` (path), `text` and/or `audio` (path), with "
        "optional `group` and `split` (see cmhn_jax/data/manifest.py).")
  base = os.path.dirname(os.path.abspath(path))
  rows = []
  if path.lower().endswith(".csv"):
    with open(path, newline="", encoding="utf-8") as f:
      raw_rows = [(i + 2, r) for i, r in enumerate(csv.DictReader(f))]
  else:
    raw_rows = []
    with open(path, encoding="utf-8") as f:
      for i, line in enumerate(f):
        if line.strip():
          try:
            raw_rows.append((i + 1, json.loads(line)))
          except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{i + 1}: not a JSON object: {e}") from e
  for line_no, r in raw_rows:
    unknown = set(r) - set(FIELDS)
    if unknown:
      raise ValueError(f"{path}:{line_no}: unknown fields {sorted(unknown)}; "
                       f"a row may have {list(FIELDS)}.")
    row = {k: (str(r[k]).strip() if r.get(k) not in (None, "") else "")
           for k in FIELDS}
    if not (row["image"] or row["text"] or row["audio"]):
      raise ValueError(f"{path}:{line_no}: row has none of image, text, audio.")
    for key in ("image", "audio"):
      if row[key]:
        row[key] = os.path.normpath(os.path.join(base, os.path.expanduser(row[key])))
        if not os.path.isfile(row[key]):
          raise FileNotFoundError(f"{path}:{line_no}: {key} file {row[key]} does not exist.")
    row["split"] = row["split"] or "train"
    row["line"] = line_no
    rows.append(row)
  if not rows:
    raise ValueError(f"Manifest {path} has no rows.")
  return rows


@dataclasses.dataclass
class ManifestConfig(tfds.core.BuilderConfig):
  manifest_path: str = ""
  sample_rate: int = 16000


class CmhnManifest(tfds_base.OfflineBuilder):
  """A user's manifest, prepared (see the module docstring)."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "First release."}
  BUILDER_CONFIGS = []  # every manifest brings its own ManifestConfig

  def __init__(self, *, check_images: bool = True, **kwargs):
    self._check_images = check_images
    kwargs.setdefault("file_format", "array_record")
    super().__init__(**kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description="A manifest of (image, text, audio) rows.",
        disable_shuffling=True,
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Tensor(shape=(), dtype=np.object_),
            "text": tfds.features.Text(),
            "audio": tfds.features.Tensor(shape=(None,), dtype=np.int16,
                                           encoding=tfds.features.Encoding.BYTES),
            "has_image": np.bool_,
            "has_text": np.bool_,
            "has_audio": np.bool_,
            "group": np.int64,
            "image/path": tfds.features.Text(),
            "audio/path": tfds.features.Text(),
            "line": np.int64,
        }),
        metadata=tfds.core.MetadataDict(),
    )

  def _split_generators(self, dl_manager):
    del dl_manager
    path = self.builder_config.manifest_path
    rows = read_manifest(path)
    by_split = collections.defaultdict(list)
    for r in rows:
      by_split[r["split"]].append(r)
    md = self.info.metadata
    md["manifest_path"] = os.path.abspath(os.path.expanduser(path))
    md["manifest_sha256"] = file_sha256(os.path.expanduser(path))
    md["sample_rate"] = self.builder_config.sample_rate
    md["modalities"] = [m for m in ("image", "text", "audio")
                        if any(r[m] for r in rows)]
    counts = collections.Counter(
        w for r in by_split.get("train", []) for w in text_lib.split_words(r["text"]))
    md["word_counts"] = dict(sorted(counts.items()))
    return {s: self._generate_examples(s, by_split[s]) for s in sorted(by_split)}

  def _generate_examples(self, split, rows):
    del split
    groups = {}
    for i, r in enumerate(rows):
      if r["group"]:
        group = groups.setdefault(r["group"], len(groups))
      else:
        group = groups.setdefault(("row", i), len(groups))
      image = b""
      if r["image"]:
        with open(r["image"], "rb") as f:
          image = f.read()
        if self._check_images:
          image_lib.check_header(image, name=r["image"])
      audio = np.zeros(0, np.int16)
      if r["audio"]:
        wave = audio_lib.read_audio(r["audio"], self.builder_config.sample_rate)
        audio = np.round(np.clip(wave, -1, 1) * 32767).astype(np.int16)
      yield i, {
          "image": image, "text": r["text"], "audio": audio,
          "has_image": bool(r["image"]), "has_text": bool(r["text"]),
          "has_audio": bool(r["audio"]), "group": group,
          "image/path": r["image"], "audio/path": r["audio"], "line": r["line"],
      }
