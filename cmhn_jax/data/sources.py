"""Datasets by name: prepare them, and open a split as raw examples.

A *raw example* is a dict, the common currency of all datasets before
preprocessing:

    image     uint8 (H, W, 3) array, encoded image bytes, or None
    text      str or None
    audio     int16 or float waveform at `audio_rate`, or None
    audio_rate, concept, group, instance, index (ints), name (str, for errors)
    redraw    (shapes only) what `shapes.redraw_image` needs to draw the
              image afresh for the same caption (`train_augment='redraw'`)

`open_dataset(config)` returns a `Dataset`; `Dataset.source(split)` a picklable
random-access sequence of raw examples (what grain's `MapDataset.source` takes).
"""

from __future__ import annotations

from collections.abc import Sequence
import contextlib
import fcntl
import glob
import json
import os
import struct

import numpy as np
import tensorflow_datasets as tfds

from cmhn_jax.data import coco as coco_lib
from cmhn_jax.data import manifest as manifest_lib
from cmhn_jax.data import shapes as shapes_lib
from cmhn_jax.data import text as text_lib

DATASETS = ("shapes", "coco", "coco_raw", "manifest", "tfds")
MODALITIES = ("image", "text", "audio")


def resolve_dir(path: str) -> str:
  return os.path.abspath(os.path.expanduser(os.fspath(path)))


@contextlib.contextmanager
def _lock(data_dir: str, name: str):
  """Serialises preparation of one dataset across processes on this host."""
  os.makedirs(data_dir, exist_ok=True)
  with open(os.path.join(data_dir, f".{name}.lock"), "w") as f:
    fcntl.flock(f, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)


# --- Reading TFDS-prepared directories -----------------------------------------


class TFRecordSource(Sequence):
  """Random access to a split stored as TFRecord files, without TensorFlow.

  TFDS writes TFRecord by default; a record is [uint64 length][uint32 crc]
  [bytes][uint32 crc]. The offsets are indexed once by reading the headers;
  records are parsed with the dataset's own features (numpy, no TF).
  """

  def __init__(self, paths: Sequence[str], features, decoders=None):
    self._paths = [os.fspath(p) for p in paths]
    self._features = features
    self._decoders = decoders
    offsets, lengths = [], []
    for p in self._paths:
      o, n = self._index(p)
      offsets.append(o)
      lengths.append(n)
    self._offsets = offsets
    self._lengths = lengths
    self._cum = np.cumsum([0] + [len(o) for o in offsets])
    self._fds = {}

  @staticmethod
  def _index(path: str):
    offsets, lengths = [], []
    size = os.path.getsize(path)
    with open(path, "rb") as f:
      pos = 0
      while pos < size:
        f.seek(pos)
        header = f.read(12)
        if len(header) < 12:
          raise ValueError(f"Truncated TFRecord file {path} at byte {pos}.")
        (n,) = struct.unpack("<Q", header[:8])
        offsets.append(pos + 12)
        lengths.append(n)
        pos += 12 + n + 4
    return np.asarray(offsets, np.int64), np.asarray(lengths, np.int64)

  def __len__(self) -> int:
    return int(self._cum[-1])

  def __getitem__(self, index):
    index = int(index)
    if not 0 <= index < len(self):
      raise IndexError(index)
    shard = int(np.searchsorted(self._cum, index, side="right") - 1)
    j = index - self._cum[shard]
    fd = self._fds.get(shard)
    if fd is None:
      fd = self._fds[shard] = os.open(self._paths[shard], os.O_RDONLY)
    data = os.pread(fd, int(self._lengths[shard][j]), int(self._offsets[shard][j]))
    return self._features.deserialize_example_np(data, decoders=self._decoders)

  def __getstate__(self):
    state = dict(self.__dict__)
    state["_fds"] = {}
    return state

  def __del__(self):
    for fd in getattr(self, "_fds", {}).values():
      try:
        os.close(fd)
      except OSError:
        pass


class _Concat(Sequence):
  """Concatenation of random-access sequences."""

  def __init__(self, parts: Sequence[Sequence]):
    self._parts = list(parts)
    self._cum = np.cumsum([0] + [len(p) for p in parts])

  def __len__(self):
    return int(self._cum[-1])

  def __getitem__(self, index):
    index = int(index)
    part = int(np.searchsorted(self._cum, index, side="right") - 1)
    return self._parts[part][index - self._cum[part]]


def _image_decoders(features) -> dict:
  """Skip TFDS's image decoding (we decode with PIL, downscaling on the fly)."""
  return {k: tfds.decode.SkipDecoding() for k, f in features.items()
          if isinstance(f, tfds.features.Image)}


def split_records(builder, split: str) -> Sequence:
  """Random-access decoded records of one split of a prepared TFDS builder."""
  decoders = _image_decoders(builder.info.features)
  file_format = builder.info.file_format
  if getattr(file_format, "value", file_format) == "array_record":
    return builder.as_data_source(split, decoders=decoders)
  paths = builder.info.splits[split].filepaths
  return TFRecordSource(paths, builder.info.features, decoders)


def find_prepared(data_dir: str, name: str, config: str = "") -> str | None:
  """Newest `data_dir/name/[config/]version` holding a dataset_info.json."""
  root = os.path.join(data_dir, name)
  patterns = ([os.path.join(root, config, "*", "dataset_info.json")] if config
              else [os.path.join(root, "*", "dataset_info.json"),
                    os.path.join(root, "*", "*", "dataset_info.json")])
  found = [os.path.dirname(p) for pat in patterns for p in glob.glob(pat)]
  found = [d for d in found if "incomplete" not in d]
  if not found:
    return None
  def version_key(d):
    try:
      return (tuple(int(v) for v in os.path.basename(d).split(".")), d)
    except ValueError:
      return ((), d)
  return max(found, key=version_key)


def _decode_text(value) -> str:
  if isinstance(value, bytes):
    return value.decode("utf-8")
  if isinstance(value, np.ndarray) and value.shape == ():
    return _decode_text(value.item())
  return str(value)


def _get(record: dict, key: str):
  for part in key.split("/") if key not in record else [key]:
    record = record[part]
  return record


# --- Raw sources ------------------------------------------------------------------


class ShapesSource(Sequence):
  def __init__(self, records, split: str, sample_rate: int):
    self._records, self._split, self._rate = records, split, sample_rate

  def __len__(self):
    return len(self._records)

  def __getitem__(self, index):
    r = self._records[index]
    concept = int(r["concept"])
    return {
        "image": r["image"], "text": _decode_text(r["caption"]),
        "audio": r["audio"], "audio_rate": self._rate, "concept": concept,
        "group": concept,
        "instance": shapes_lib.instance_id(concept, int(r["size"]),
                                           int(r["position"])),
        "index": int(index), "name": f"shapes/{self._split}[{index}]",
        "redraw": shapes_lib.redraw_fields(r, r["image"].shape[0]),
    }


class CaptionsSource(Sequence):
  """One example per (record, caption) pair: index = record * k + caption.

  Used for COCO (`k` = 5 captions per image, group = image index) and any TFDS
  dataset of (image and/or audio, one or several texts) records.
  """

  def __init__(self, records, split: str, *, k: int, image_key: str,
               text_key: str, audio_key: str, name_key: str, audio_rate: int,
               label: str):
    self._records, self._split, self._k = records, split, k
    self._image_key, self._text_key, self._audio_key = image_key, text_key, audio_key
    self._name_key, self._rate, self._label = name_key, audio_rate, label

  def __len__(self):
    return len(self._records) * self._k

  def __getitem__(self, index):
    record_index, caption = divmod(int(index), self._k)
    r = self._records[record_index]
    name = f"{self._label}/{self._split} record {record_index}"
    if self._name_key:
      with contextlib.suppress(KeyError):
        name += f" ({_decode_text(_get(r, self._name_key))})"
    text = None
    if self._text_key:
      texts = _get(r, self._text_key)
      if isinstance(texts, (list, tuple, np.ndarray)) and np.ndim(texts) > 0:
        text = _decode_text(texts[caption % len(texts)]) if len(texts) else None
      else:
        text = _decode_text(texts)
    image = _get(r, self._image_key) if self._image_key else None
    audio = _get(r, self._audio_key) if self._audio_key else None
    return {
        "image": image, "text": text, "audio": audio, "audio_rate": self._rate,
        "concept": -1, "group": record_index, "instance": record_index,
        "index": int(index), "name": name,
    }


class ManifestSource(Sequence):
  def __init__(self, records, split: str, sample_rate: int):
    self._records, self._split, self._rate = records, split, sample_rate

  def __len__(self):
    return len(self._records)

  def __getitem__(self, index):
    r = self._records[index]
    group = int(r["group"])
    path = _decode_text(r["image/path"]) or _decode_text(r["audio/path"])
    return {
        "image": r["image"] if r["has_image"] else None,
        "text": _decode_text(r["text"]) if r["has_text"] else None,
        "audio": r["audio"] if r["has_audio"] else None,
        "audio_rate": self._rate, "concept": -1, "group": group,
        "instance": group, "index": int(index),
        "name": f"manifest/{self._split} row {index} (line {int(r['line'])}"
                f"{', ' + path if path else ''})",
    }


# --- Datasets ----------------------------------------------------------------------


class Dataset:
  """A prepared dataset: its splits, modalities and raw-example sources."""

  name: str
  modalities: tuple[str, ...]
  num_concepts: int | None = None
  audio_rate: int = 16000

  def splits(self) -> tuple[str, ...]:
    raise NotImplementedError

  def _source(self, split: str) -> Sequence:
    raise NotImplementedError

  def source(self, split: str) -> Sequence:
    if split not in self.splits():
      raise ValueError(
          f"Unknown split {split!r} of dataset {self.name!r}; available: "
          f"{list(self.splits())}.")
    return self._source(split)

  def vocabulary(self, min_count: int = 1, max_size: int | None = None) -> list[str]:
    """Words for the word-level tokenizer (most frequent first)."""
    counts = self.word_counts()
    words = sorted((w for w, c in counts.items() if c >= min_count),
                   key=lambda w: (-counts[w], w))
    return words[:max_size] if max_size else words

  def word_counts(self) -> dict[str, int]:
    raise NotImplementedError


class _TFDSDataset(Dataset):
  """Shared by datasets read from one prepared TFDS builder."""

  builder = None

  def splits(self):
    return tuple(self.builder.info.splits.keys())


class ShapesDataset(_TFDSDataset):
  name = "shapes"
  modalities = MODALITIES
  num_concepts = shapes_lib.NUM_CONCEPTS

  def __init__(self, cfg, *, prepare: bool):
    config = shapes_lib.make_config(cfg.builder_config or "default",
                                    seed=cfg.get("shapes_seed"),
                                    image_size=cfg.get("shapes_image_size"))
    data_dir = resolve_dir(cfg.data_dir)
    # TFDS wants the class's own configs by name (it checks identity, which a
    # copy unpickled in a worker process would fail), custom ones as objects.
    if shapes_lib.BUILDER_CONFIGS.get(config.name) is config:
      config = config.name
    builder = shapes_lib.Shapes(data_dir=data_dir, config=config,
                                prepare_workers=int(cfg.get("prepare_workers", 0)))
    if not builder.is_prepared():
      if not prepare:
        raise FileNotFoundError(
            f"shapes/{builder.builder_config.name} is not prepared in {data_dir}. Prepare it with "
            "`cmhn_jax.data.prepare(config)` or `python -m cmhn_jax.data "
            f"--name=shapes --builder_config={cfg.builder_config} "
            f"--data_dir={data_dir}` (it is generated offline).")
      with _lock(data_dir, f"shapes-{builder.builder_config.name}"):
        if not builder.is_prepared():
          builder.download_and_prepare()
      builder = shapes_lib.Shapes(data_dir=data_dir, config=config)
    self.builder = builder
    self.audio_rate = int(builder.info.metadata["sample_rate"])

  def _source(self, split):
    return ShapesSource(split_records(self.builder, split), split, self.audio_rate)

  def vocabulary(self, min_count=1, max_size=None):
    del min_count, max_size  # the grammar's words, all of them
    return list(self.builder.info.metadata["vocabulary"])


class CaptionsDataset(_TFDSDataset):
  """COCO captions (prepared by TFDS or by CocoRaw) and generic TFDS datasets."""

  def __init__(self, name: str, builder, *, image_key: str, text_key: str,
               audio_key: str = "", name_key: str = "", k: int = 1,
               split_map: dict | None = None, word_counts=None,
               cache_dir: str | None = None):
    self.name, self.builder, self._k = name, builder, k
    self._keys = dict(image_key=image_key, text_key=text_key,
                      audio_key=audio_key, name_key=name_key)
    self.modalities = tuple(m for m, key in zip(MODALITIES, (image_key, text_key, audio_key)) if key)
    available = set(builder.info.splits.keys())
    split_map = split_map or {}
    self._split_map = {s: [p for p in parts if p in available]
                       for s, parts in split_map.items()}
    self._split_map = {s: p for s, p in self._split_map.items() if p}
    for s in available:
      self._split_map.setdefault(s, [s])
    self._word_counts = word_counts
    self._cache_dir = cache_dir
    self.audio_rate = 16000
    if audio_key:
      feature = _get(builder.info.features, audio_key)
      self.audio_rate = int(getattr(feature, "sample_rate", None) or 16000)

  def splits(self):
    return tuple(sorted(self._split_map))

  def _records(self, split):
    parts = [split_records(self.builder, p) for p in self._split_map[split]]
    return parts[0] if len(parts) == 1 else _Concat(parts)

  def _source(self, split):
    return CaptionsSource(self._records(split), split, k=self._k,
                          audio_rate=self.audio_rate, label=self.name,
                          **self._keys)

  def word_counts(self):
    if self._word_counts is not None:
      return self._word_counts
    cache = None
    if self._cache_dir:
      key = self.builder.data_dir.strip("/").replace("/", "_")
      cache = os.path.join(self._cache_dir, f"{key}-word_counts.json")
      if os.path.exists(cache):
        with open(cache, encoding="utf-8") as f:
          self._word_counts = json.load(f)
        return self._word_counts
    split = "train" if "train" in self.splits() else self.splits()[0]
    counts = {}
    records = self._records(split)
    for i in range(len(records)):
      texts = _get(records[i], self._keys["text_key"])
      if not (isinstance(texts, (list, tuple, np.ndarray)) and np.ndim(texts)):
        texts = [texts]
      for t in list(texts)[:self._k]:
        for w in text_lib.split_words(_decode_text(t)):
          counts[w] = counts.get(w, 0) + 1
    self._word_counts = counts
    if cache:
      with contextlib.suppress(OSError):
        os.makedirs(os.path.dirname(cache), exist_ok=True)
        tmp = f"{cache}.tmp{os.getpid()}"
        with open(tmp, "w", encoding="utf-8") as f:
          json.dump(counts, f)
        os.replace(tmp, cache)
    return counts


class ManifestDataset(_TFDSDataset):
  name = "manifest"

  def __init__(self, cfg, *, prepare: bool):
    path = os.path.expanduser(cfg.manifest_path or "")
    if not path:
      raise ValueError("name='manifest' needs `manifest_path` (a .jsonl or .csv file).")
    config_name = cfg.builder_config or os.path.splitext(os.path.basename(path))[0]
    data_dir = resolve_dir(cfg.data_dir)
    config = manifest_lib.ManifestConfig(
        name=config_name, manifest_path=path, sample_rate=int(cfg.sample_rate))
    builder = manifest_lib.CmhnManifest(data_dir=data_dir, config=config)
    if not builder.is_prepared():
      if not prepare:
        raise FileNotFoundError(
            f"Manifest dataset {config_name!r} is not prepared in {data_dir}; "
            "run `cmhn_jax.data.prepare(config)`.")
      manifest_lib.read_manifest(path)  # fail early, with the row at fault
      with _lock(data_dir, f"manifest-{config_name}"):
        if not builder.is_prepared():
          builder.download_and_prepare()
      builder = manifest_lib.CmhnManifest(data_dir=data_dir, config=config)
    md = builder.info.metadata
    if os.path.exists(path) and manifest_lib.file_sha256(path) != md["manifest_sha256"]:
      raise ValueError(
          f"Manifest {path} changed since it was prepared into {builder.data_dir}. "
          "Nothing is rebuilt over existing data: set a new `builder_config` name "
          "to prepare it again beside the old one (or remove the old directory "
          "yourself).")
    self.builder = builder
    self.modalities = tuple(md["modalities"])
    self.audio_rate = int(md["sample_rate"])

  def _source(self, split):
    return ManifestSource(split_records(self.builder, split), split, self.audio_rate)

  def word_counts(self):
    return dict(self.builder.info.metadata["word_counts"])


def _coco_raw(cfg, *, prepare: bool) -> CaptionsDataset:
  raw_dir = os.path.expanduser(cfg.raw_dir or "")
  year = cfg.builder_config or (coco_lib.detect_year(raw_dir) if raw_dir else "2014")
  if year not in ("2014", "2017"):
    raise ValueError(f"coco_raw builder_config must be '2014' or '2017', got {year!r}.")
  data_dir = resolve_dir(cfg.data_dir)
  kwargs = dict(raw_dir=raw_dir, karpathy_json=cfg.get("karpathy_json", ""))
  builder = coco_lib.CocoRaw(data_dir=data_dir, config=year, **kwargs)
  if not builder.is_prepared():
    if not prepare:
      raise FileNotFoundError(
          f"coco_raw/{year} is not prepared in {data_dir}; run "
          "`cmhn_jax.data.prepare(config)` with `raw_dir` set.")
    coco_lib.check_raw_dir(raw_dir, year, kwargs["karpathy_json"])
    with _lock(data_dir, f"coco_raw-{year}"):
      if not builder.is_prepared():
        builder.download_and_prepare()
    builder = coco_lib.CocoRaw(data_dir=data_dir, config=year, **kwargs)
  return CaptionsDataset(
      "coco_raw", builder, image_key="image", text_key="captions/text",
      name_key="image/filename", k=int(cfg.captions_per_image),
      word_counts=dict(builder.info.metadata["word_counts"]))


def _prepared_tfds(cfg, name: str) -> tuple:
  data_dir = resolve_dir(cfg.data_dir)
  builder_dir = cfg.get("tfds_dir") or find_prepared(
      data_dir, name, cfg.builder_config or "")
  if not builder_dir or not os.path.exists(
      os.path.join(builder_dir, "dataset_info.json")):
    hint = (
        "Prepare it with TFDS on any machine that has TensorFlow "
        f"(`tfds build {name} --data_dir={data_dir}`; add "
        "`--file_format=array_record` for faster reads) and copy the folder "
        "here, or set `tfds_dir` to the prepared version folder.")
    if name == "coco_captions":
      hint += (" Without TensorFlow, use name='coco_raw' with `raw_dir` pointing "
               "at the raw COCO files (see cmhn_jax/data/coco.py).")
    raise FileNotFoundError(
        f"No prepared TFDS dataset {name!r}"
        f"{'/' + cfg.builder_config if cfg.builder_config else ''} under "
        f"{data_dir} (looked for {os.path.join(data_dir, name)}/*/"
        f"[version]/dataset_info.json). {hint}")
  return tfds.builder_from_directory(builder_dir), data_dir


def _coco(cfg, *, prepare: bool) -> CaptionsDataset:
  del prepare  # TFDS-prepared data is never written here
  builder, data_dir = _prepared_tfds(cfg, cfg.get("tfds_name") or "coco_captions")
  return CaptionsDataset(
      "coco", builder, image_key="image", text_key="captions/text",
      name_key="image/filename", k=int(cfg.captions_per_image),
      split_map={"train": ["train", "restval"], "validation": ["val"],
                 "test": ["test"]},
      cache_dir=os.path.join(data_dir, "cmhn_cache"))


def _generic_tfds(cfg, *, prepare: bool) -> CaptionsDataset:
  del prepare
  name = cfg.get("tfds_name")
  if not name and not cfg.get("tfds_dir"):
    raise ValueError("name='tfds' needs `tfds_name` (or `tfds_dir`).")
  builder, data_dir = _prepared_tfds(cfg, name or "")
  keys = dict(image_key=cfg.get("image_key", ""), text_key=cfg.get("text_key", ""),
              audio_key=cfg.get("audio_key", ""))
  if not any(keys.values()):
    raise ValueError("name='tfds' needs at least one of image_key, text_key, audio_key "
                     f"(features of {builder.name}: {list(builder.info.features)}).")
  return CaptionsDataset(
      builder.name, builder, name_key=cfg.get("name_key", ""),
      k=int(cfg.captions_per_image) if cfg.get("text_is_list") else 1,
      split_map=({"validation": ["val"]}
                 if "validation" not in builder.info.splits else None),
      cache_dir=os.path.join(data_dir, "cmhn_cache"), **keys)


_OPENERS = {
    "shapes": ShapesDataset,
    "coco": _coco,
    "coco_raw": _coco_raw,
    "manifest": ManifestDataset,
    "tfds": _generic_tfds,
}


def open_dataset(cfg, *, prepare: bool | None = None) -> Dataset:
  """The dataset named by `cfg.name`, prepared first if allowed and missing."""
  if cfg.name not in _OPENERS:
    raise ValueError(f"Unknown dataset {cfg.name!r}; available: {list(DATASETS)}.")
  if prepare is None:
    prepare = bool(cfg.get("auto_prepare", True))
  return _OPENERS[cfg.name](cfg, prepare=prepare)

