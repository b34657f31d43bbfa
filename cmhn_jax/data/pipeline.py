"""The grain input pipeline: raw examples -> preprocessed, batched, sharded.

    MapDataset.source(raw examples of a split)
      -> this process's shard ([shard_index::shard_count])
      -> train: shuffle(seed) -> repeat(num_epochs) -> random_map(preprocess)
         eval:  map(preprocess) -> pad to whole batches (`valid` marks padding)
      -> batch -> to_iter_dataset (threads, prefetch) -> mp_prefetch (workers)

Batching happens on the MapDataset, so batch i always holds the same examples:
the batch sequence is the same for any number of workers, and an iterator's
state (a small dict) restores it exactly.
"""

from __future__ import annotations

import concurrent.futures
from collections.abc import Iterator
import dataclasses
import math
import multiprocessing
import threading

from absl import flags
import grain
import jax
import ml_collections
import numpy as np

from cmhn_jax.data import audio as audio_lib
from cmhn_jax.data import image as image_lib
from cmhn_jax.data import shapes as shapes_lib
from cmhn_jax.data import sources
from cmhn_jax.data import text as text_lib

AUDIO_FEATURES = ("logmel", "waveform")
AUGMENTS = ("none", "random_resized_crop", "redraw")


@dataclasses.dataclass(frozen=True)
class DataInfo:
  """What a model and a trainer need to know about a pipeline's batches.

  Attributes:
    name, split: the dataset and split.
    modalities: those present in the dataset, in ('image', 'text', 'audio')
      order; the batch has arrays for these only (and `has_*` for all three).
    num_examples: examples in the split, all shards together (COCO: one per
      (image, caption) pair).
    vocab_size, pad_id, max_text_len: text (vocab_size is None without text).
    image_size: output image side.
    audio_feature: 'logmel' or 'waveform'; n_mels; audio_frames: T of a
      log-mel batch (B, T, n_mels), or S of a waveform batch (B, S).
    audio_samples, sample_rate: waveform length and rate.
    num_concepts: concept count (shapes: 64), None where unknown.
    local_batch_size, global_batch_size: leading dims of a local / global batch.
    num_batches: local batches in the pipeline (None when it repeats forever).
  """

  name: str
  split: str
  modalities: tuple[str, ...]
  num_examples: int
  vocab_size: int | None
  pad_id: int
  max_text_len: int
  image_size: int
  audio_feature: str
  n_mels: int
  audio_frames: int
  audio_samples: int
  sample_rate: int
  num_concepts: int | None
  local_batch_size: int
  global_batch_size: int
  num_batches: int | None


def make_tokenizer(cfg, dataset: sources.Dataset):
  if cfg.tokenizer == "word":
    return text_lib.WordTokenizer(dataset.vocabulary(
        int(cfg.vocab_min_count), int(cfg.vocab_max_size) or None))
  return text_lib.HFTokenizer(cfg.tokenizer)


class Preprocessor:
  """Raw example -> fixed-shape numpy arrays (picklable, for worker processes)."""

  def __init__(self, cfg, modalities, tokenizer, *, train: bool):
    if cfg.audio_feature not in AUDIO_FEATURES:
      raise ValueError(f"audio_feature must be one of {AUDIO_FEATURES}, got "
                       f"{cfg.audio_feature!r}.")
    if cfg.train_augment not in AUGMENTS:
      raise ValueError(f"train_augment must be one of {AUGMENTS}, got "
                       f"{cfg.train_augment!r}.")
    self.modalities = tuple(modalities)
    self.tokenizer = tokenizer
    self.train = train
    self.image_size = int(cfg.image_size)
    self.mean = tuple(float(v) for v in cfg.image_mean)
    self.std = tuple(float(v) for v in cfg.image_std)
    self.augment = cfg.train_augment if train else "none"
    self.redraw = self.augment == "redraw"
    self.crop_scale = tuple(float(v) for v in cfg.crop_scale)
    self.text_len = int(cfg.text_max_len)
    self.audio_feature = cfg.audio_feature
    self.sample_rate = int(cfg.sample_rate)
    self.n_mels = int(cfg.n_mels)
    self.win = int(cfg.win_length)
    self.hop = int(cfg.hop_length)
    self.samples = int(round(float(cfg.max_audio_seconds) * self.sample_rate))
    if self.samples < self.win:
      raise ValueError("max_audio_seconds is shorter than one analysis window.")
    self.frames = audio_lib.num_frames(self.samples, self.win, self.hop)

  # Shapes of the outputs.
  def empty(self) -> dict:
    """A padding example: zeros, no modality, `valid` False, ids -1."""
    out = {}
    if "image" in self.modalities:  # uint8 until `finalize` normalises a batch
      out["image"] = np.zeros((self.image_size, self.image_size, 3), np.uint8)
    if "text" in self.modalities:
      out["text"] = np.full(self.text_len, self.tokenizer.pad_id, np.int32)
      out["text_mask"] = np.zeros(self.text_len, bool)
    if "audio" in self.modalities:
      # Per example: the padded waveform and its length. `batch` turns them
      # into the mask, and into log-mel features for a whole batch at once.
      out["audio"] = np.zeros(self.samples, np.float32)
      out["audio_len"] = np.int32(0)
    for m in sources.MODALITIES:
      out[f"has_{m}"] = np.bool_(False)
    for k in ("concept", "group", "index", "instance"):
      out[k] = np.int32(-1)
    out["valid"] = np.bool_(False)
    if self.redraw:  # kept until `finalize`, so a cached row can be redrawn
      out["redraw"] = np.full(len(shapes_lib.REDRAW_FIELDS), -1, np.int32)
    return out

  def __call__(self, raw: dict, rng: np.random.Generator | None = None) -> dict:
    out = self.empty()
    if self.redraw and raw.get("image") is not None:
      out["redraw"] = np.asarray(raw["redraw"], np.int32)
    if "image" in self.modalities and raw.get("image") is not None:
      if self.redraw and rng is not None:
        out["image"] = _redraw(out["redraw"], self.redraw_seed(rng), self.image_size)
      else:
        out["image"] = self._image(raw["image"], raw["name"], rng)
      out["has_image"] = np.bool_(True)
    if "text" in self.modalities and raw.get("text") is not None:
      out["text"], out["text_mask"] = self.tokenizer.encode(raw["text"], self.text_len)
      out["has_text"] = np.bool_(True)
    if "audio" in self.modalities and raw.get("audio") is not None:
      out["audio"], out["audio_len"] = self._audio(raw["audio"], raw["audio_rate"], rng)
      out["has_audio"] = np.bool_(True)
    for k in ("concept", "group", "index", "instance"):
      out[k] = np.int32(raw[k])
    out["valid"] = np.bool_(True)
    return out

  def _image(self, img, name: str, rng) -> np.ndarray:
    if isinstance(img, (bytes, np.bytes_)) or (
        isinstance(img, np.ndarray) and img.dtype == object):
      data = img.item() if isinstance(img, np.ndarray) else bytes(img)
      img = image_lib.decode(data, name=name, min_size=self.image_size)
    elif not (isinstance(img, np.ndarray) and img.ndim == 3):
      raise image_lib.CorruptImageError(f"Image {name} is not an image array.")
    if self.augment == "random_resized_crop" and rng is not None:
      pixels = image_lib.random_resized_crop(img, self.image_size, rng,
                                             scale=self.crop_scale)
    else:
      pixels = image_lib.resize_centre_crop(img, self.image_size)
    return pixels

  @staticmethod
  def redraw_seed(rng: np.random.Generator) -> int:
    """The one draw a redraw takes from an example's rng (the same with or without cache)."""
    return int(rng.integers(2**63))

  def _audio(self, wave, rate: int, rng):
    x = np.asarray(wave)
    if x.dtype.kind in "iu":
      x = x.astype(np.float32) / 32768.0
    x = x.astype(np.float32)
    if rate != self.sample_rate:
      x = audio_lib.resample(x, rate, self.sample_rate)
    n = len(x)
    if n > self.samples:  # random crop in training, the start in eval
      start = int(rng.integers(0, n - self.samples + 1)) if (
          self.train and rng is not None) else 0
      x, n = x[start:start + self.samples], self.samples
    padded = np.zeros(self.samples, np.float32)
    padded[:n] = x
    return padded, np.int32(n)

  def batch(self, examples) -> dict[str, np.ndarray]:
    """Examples -> a batch (`collate`, then `finalize`)."""
    return self.finalize(self.collate(examples))

  def collate(self, examples) -> dict[str, np.ndarray]:
    """Stacks examples; audio becomes features and masks, for the whole batch
    at once. Images stay uint8 (compact, for the cache)."""
    out = {k: np.stack([e[k] for e in examples]) for k in examples[0]}
    if "audio" in out:
      lengths = out.pop("audio_len")
      if self.audio_feature == "waveform":
        out["audio_mask"] = np.arange(self.samples)[None, :] < lengths[:, None]
      else:
        out["audio"] = audio_lib.log_mel_spectrogram(
            out["audio"], sample_rate=self.sample_rate, n_mels=self.n_mels,
            win_length=self.win, hop_length=self.hop)
        out["audio_mask"] = audio_lib.frame_mask(lengths, self.samples, self.win,
                                                 self.hop)
    return out

  def finalize(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Normalises the batch's images; missing images stay all zeros."""
    batch.pop("redraw", None)
    if "image" in batch:
      image = image_lib.normalize(batch["image"], self.mean, self.std)
      image[~batch["has_image"]] = 0.0
      batch["image"] = image
    return batch

  def train_fn(self, raw, rng):
    return self(raw, rng)

  def eval_fn(self, raw):
    return self(raw, None)


def _redraw(fields, seed: int, image_size: int) -> np.ndarray:
  """`shapes.redraw_image` at the dataset's own side, then the pipeline's resize (module-level,
  so worker processes can run it)."""
  img = shapes_lib.redraw_image(fields, np.random.default_rng(seed))
  return image_lib.resize_centre_crop(img, image_size)


def _redraw_many(tasks) -> list[np.ndarray]:
  return [_redraw(*t) for t in tasks]


class _Cache:
  """A shard's examples, preprocessed once (as for eval) and held in memory.

  `batch(items)` gathers rows (index -1 gives a padding row) and finalises
  them: a batch costs a few copies instead of reading and featurising. With
  `train_augment='redraw'` an item is `(index, seed)` and the row's image is
  drawn afresh from that seed, as the uncached pipeline would draw it.
  """

  def __init__(self, ds: grain.MapDataset, pre: Preprocessor, read_threads: int,
               chunk: int = 256, redraw_workers: int = 0):
    self._pre = pre
    # Redrawing is pure Python/PIL work that holds the GIL (0.8 ms an image): threads do not
    # help, processes do. Spawned (not forked: the parent runs JAX threads) on first use.
    self._redraw_workers = int(redraw_workers) if pre.redraw else 0
    self._pool = None
    self._pool_lock = threading.Lock()  # batches are made in grain's read threads
    parts = ds.map(pre.eval_fn).batch(chunk, batch_fn=pre.collate).to_iter_dataset(
        grain.ReadOptions(num_threads=max(1, read_threads), prefetch_buffer_size=2))
    parts = list(parts)
    self.arrays = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    self._empty = pre.collate([pre.empty()])

  @property
  def nbytes(self) -> int:
    return sum(v.nbytes for v in self.arrays.values())

  def batch(self, items) -> dict[str, np.ndarray]:
    seeds = None
    if self._pre.redraw:
      items, seeds = zip(*((i, None) if np.ndim(i) == 0 else i for i in items))
    idx = np.asarray(items, np.int64)
    pad = idx < 0
    out = {k: v[np.where(pad, 0, idx)] for k, v in self.arrays.items()}
    if pad.any():
      for k, v in out.items():
        v[pad] = self._empty[k][0]
    if seeds is not None and "image" in out:
      rows = np.flatnonzero(~pad & out["has_image"])
      tasks = [(out["redraw"][r], seeds[r], self._pre.image_size) for r in rows]
      if self._redraw_workers and len(tasks) > 1:  # one contiguous part per worker
        bounds = np.linspace(0, len(tasks), self._redraw_workers + 1).astype(int)
        parts = [tasks[lo:hi] for lo, hi in zip(bounds[:-1], bounds[1:])]
        images = [img for part in self._executor().map(_redraw_many, parts) for img in part]
      else:
        images = _redraw_many(tasks)
      for r, img in zip(rows, images):
        out["image"][r] = img
    return self._pre.finalize(out)

  def _executor(self) -> concurrent.futures.ProcessPoolExecutor:
    with self._pool_lock:
      if self._pool is None:
        self._pool = concurrent.futures.ProcessPoolExecutor(
            self._redraw_workers, mp_context=multiprocessing.get_context("spawn"))
      return self._pool

  def close(self) -> None:
    with self._pool_lock:
      if self._pool is not None:
        self._pool.shutdown(cancel_futures=True)
        self._pool = None


def _cache_bytes_per_example(pre: Preprocessor) -> int:
  row = pre.collate([pre.empty()])
  return sum(v.nbytes for v in row.values())


def _use_cache(cfg, pre: Preprocessor, num_examples: int) -> bool:
  """`cache` True/False, or None (auto): shapes, without augmentation or with
  `redraw` (which the cache does itself), that fits in `cache_max_mb`: its
  preprocessing is otherwise deterministic, so nothing is lost."""
  mode = cfg.get("cache")
  if mode is not None:
    return bool(mode)
  size_mb = num_examples * _cache_bytes_per_example(pre) / 2**20
  return (cfg.name == "shapes" and cfg.train_augment in ("none", "redraw")
          and size_mb <= float(cfg.get("cache_max_mb", 2048)))


class _PaddedMapDataset(grain.MapDataset):
  """`parent`, then copies of `pad` up to `length` elements."""

  _MUTATES_ELEMENT_SPEC = False

  def __init__(self, parent: grain.MapDataset, length: int, pad):
    super().__init__(parent)
    self._length = length
    self._parent_length = len(parent)
    self._pad = pad

  def __len__(self):
    return self._length

  def __getitem__(self, index):
    if isinstance(index, slice):
      return self.slice(index)
    index %= self._length
    if index < self._parent_length:
      return self._parent[index]
    return self._pad

  def __str__(self):
    return f"PaddedMapDataset(length={self._length})"


class _PipelineIterator(Iterator):
  def __init__(self, pipeline: "DataPipeline", grain_iter):
    self._pipeline = pipeline
    self._it = grain_iter

  def __next__(self) -> dict[str, np.ndarray]:
    return next(self._it)

  def get_state(self) -> dict:
    return self._it.get_state()

  def set_state(self, state: dict) -> None:
    self._it.set_state(state)

  def close(self) -> None:
    close = getattr(self._it, "close", None)
    if close is not None:
      close()


class DataPipeline:
  """Iterable over this process's batches (dicts of numpy arrays).

  `iter(pipeline)` starts a new pass from the beginning, or from the state given
  to `set_state` before it. `get_state()` is the state of the latest iterator:
  a JSON-serialisable dict; restoring it (`set_state`, before or after
  `iter`) resumes exactly the batch sequence that would have followed.
  """

  def __init__(self, dataset: grain.IterDataset, info: DataInfo, on_close=None):
    self._dataset = dataset
    self.info = info
    self._on_close = on_close
    self._iterator: _PipelineIterator | None = None
    self._pending_state: dict | None = None

  def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
    self._close_iterator()  # a new pass keeps the cache's redraw workers
    self._iterator = _PipelineIterator(self, iter(self._dataset))
    if self._pending_state is not None:
      self._iterator.set_state(self._pending_state)
      self._pending_state = None
    return self._iterator

  def get_state(self) -> dict:
    if self._iterator is None:
      if self._pending_state is not None:
        return self._pending_state
      self._iterator = _PipelineIterator(self, iter(self._dataset))
    return self._iterator.get_state()

  def set_state(self, state: dict) -> None:
    if self._iterator is not None:
      self._iterator.set_state(state)
    else:
      self._pending_state = state

  def close(self) -> None:
    """Stops worker processes of the current iterator and the cache's redraw workers."""
    self._close_iterator()
    if self._on_close is not None:
      self._on_close()

  def _close_iterator(self) -> None:
    if self._iterator is not None:
      self._iterator.close()
      self._iterator = None

  def __len__(self) -> int:
    if self.info.num_batches is None:
      raise TypeError("This pipeline repeats forever.")
    return self.info.num_batches


def _shard_seeds(seed: int, shard_index: int) -> tuple[int, int]:
  """(shuffle seed, augmentation seed) for one shard, as uint32."""
  s = np.random.SeedSequence([int(seed), int(shard_index)]).generate_state(2)
  return int(s[0]), int(s[1])


def get_pipeline(data_config: ml_collections.ConfigDict, split: str, *, train: bool,
                 global_batch_size: int, seed: int = 0,
                 shard_index: int | None = None, shard_count: int | None = None,
                 num_epochs: int | None = None,
                 drop_remainder: bool = True) -> DataPipeline:
  """This process's pipeline over `split` (see the module docstring).

  Args:
    data_config: see `default_data_config`.
    split: 'train', 'validation', 'test' (or the dataset's own split names).
    train: shuffle, repeat and augment; else a deterministic pass that keeps
      every example, padding the last batch (`valid` False on padding).
    global_batch_size: summed over processes; must divide by shard_count.
    seed: shuffling and augmentation seed.
    shard_index, shard_count: this process's shard; default
      jax.process_index() / jax.process_count().
    num_epochs: passes over the data; None repeats forever in training, and
      means 1 for eval.
    drop_remainder: training only: drop the last partial batch of a finite
      pipeline (else it is padded, like eval batches).
  """
  shard_index = jax.process_index() if shard_index is None else int(shard_index)
  shard_count = jax.process_count() if shard_count is None else int(shard_count)
  if not 0 <= shard_index < shard_count:
    raise ValueError(f"shard_index {shard_index} not in [0, {shard_count}).")
  if global_batch_size % shard_count:
    raise ValueError(f"global_batch_size {global_batch_size} does not divide "
                     f"into {shard_count} shards.")
  local_batch = global_batch_size // shard_count
  if not train and num_epochs is None:
    num_epochs = 1
  if num_epochs is not None and num_epochs < 1:
    raise ValueError(f"num_epochs must be >= 1 or None, got {num_epochs}.")

  dataset = sources.open_dataset(data_config)
  source = dataset.source(split)
  tokenizer = make_tokenizer(data_config, dataset) if "text" in dataset.modalities else None
  pre = Preprocessor(data_config, dataset.modalities, tokenizer, train=train)
  if pre.redraw and dataset.name != "shapes":
    raise ValueError(
        f"train_augment='redraw' draws each image afresh from what its caption states, which "
        f"only the `shapes` dataset can do, not {dataset.name!r}. Use "
        f"train_augment='random_resized_crop' or 'none'.")
  n = len(source)

  ds = grain.MapDataset.source(source)
  if train:
    # Equal shard sizes, so every process runs the same number of steps.
    per_shard = n // shard_count
    if per_shard == 0:
      raise ValueError(f"Split {split!r} has {n} examples, fewer than {shard_count} shards.")
    ds = ds[:per_shard * shard_count][shard_index::shard_count]
  else:
    per_shard = math.ceil(n / shard_count)  # the largest shard
    ds = ds[shard_index::shard_count]
  cache = None
  if _use_cache(data_config, pre, len(ds)):
    # Items are indices into the cache; padding is index -1.
    cache = _Cache(ds, pre, int(data_config.read_threads),
                   redraw_workers=int(data_config.num_workers))
    ds, pad, batch_fn = grain.MapDataset.range(len(ds)), -1, cache.batch
  else:
    pad, batch_fn = pre.empty(), pre.batch

  if train:
    shuffle_seed, augment_seed = _shard_seeds(seed, shard_index)
    ds = ds.shuffle(seed=shuffle_seed).repeat(num_epochs)
    if cache is None:
      ds = ds.random_map(pre.train_fn, seed=augment_seed)
    elif pre.redraw:  # the same per-example rng as `train_fn` gets, so the same images
      ds = ds.random_map(lambda i, rng: (i, pre.redraw_seed(rng)), seed=augment_seed)
    if num_epochs is None:
      num_batches = None
    elif drop_remainder:
      num_batches = per_shard * num_epochs // local_batch
    else:
      num_batches = math.ceil(per_shard * num_epochs / local_batch)
      ds = _PaddedMapDataset(ds, num_batches * local_batch, pad)
    if num_batches == 0:
      raise ValueError(
          f"Split {split!r} has {per_shard} examples per shard, fewer than one "
          f"local batch of {local_batch}.")
  else:
    if cache is None:
      ds = ds.map(pre.eval_fn)
    if num_epochs > 1:
      ds = ds.repeat(num_epochs)
    num_batches = math.ceil(per_shard * num_epochs / local_batch)
    ds = _PaddedMapDataset(ds, num_batches * local_batch, pad)
  ds = ds.batch(local_batch, drop_remainder=train and drop_remainder,
                batch_fn=batch_fn)
  read_options = grain.ReadOptions(num_threads=int(data_config.read_threads),
                                   prefetch_buffer_size=int(data_config.prefetch))
  it_ds = ds.to_iter_dataset(read_options)
  # Worker processes would each get a copy of the cache, for no gain.
  if int(data_config.num_workers) > 0 and cache is None:
    # grain's worker processes read absl flags, which are unparsed outside
    # absl.app (pytest, notebooks): google/grain issues #1355 and #1360.
    if not flags.FLAGS.is_parsed():
      flags.FLAGS.mark_as_parsed()
    it_ds = it_ds.mp_prefetch(grain.MultiprocessingOptions(
        num_workers=int(data_config.num_workers),
        per_worker_buffer_size=int(data_config.prefetch)))

  audio_frames = pre.samples if pre.audio_feature == "waveform" else pre.frames
  info = DataInfo(
      name=data_config.name, split=split, modalities=dataset.modalities,
      num_examples=n,
      vocab_size=tokenizer.vocab_size if tokenizer is not None else None,
      pad_id=tokenizer.pad_id if tokenizer is not None else 0,
      max_text_len=pre.text_len, image_size=pre.image_size,
      audio_feature=pre.audio_feature, n_mels=pre.n_mels,
      audio_frames=audio_frames, audio_samples=pre.samples,
      sample_rate=pre.sample_rate, num_concepts=dataset.num_concepts,
      local_batch_size=local_batch, global_batch_size=global_batch_size,
      num_batches=num_batches)
  return DataPipeline(it_ds, info, on_close=cache.close if cache is not None else None)


def to_global_batch(local_batch: dict[str, np.ndarray], mesh: jax.sharding.Mesh,
                    data_axis: str = "data") -> dict[str, jax.Array]:
  """Assembles per-process batches into global arrays, batch dim sharded over
  `data_axis` (replicated over the other mesh axes)."""
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(data_axis))
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
          for k, v in local_batch.items()}


def prepare(data_config: ml_collections.ConfigDict) -> None:
  """Prepares the dataset on disk if missing; never overwrites what exists.

  TFDS-prepared datasets ('coco', 'tfds') cannot be prepared here: a missing
  one raises FileNotFoundError saying how to get it.
  """
  sources.open_dataset(data_config, prepare=True)
