"""`shapes`: the embedded (image, text, speech) dataset, generated offline.

Every example shows one coloured shape on a textured background, a caption that
describes it ("a small scarlet disc at the top left") and the caption spoken
aloud by eSpeak NG. A *concept* is (shape, colour): 8 x 8 = 64 concepts. On top
of the concept each instance has a size, a position on a 3 x 3 grid, a rotation
and a background texture; the caption names size and position too, so
instance-level relevance (same concept, size and position) is meaningful.

Generation is a pure function of (builder config, split, example index): the
same config gives the same bytes, whatever the number of worker processes.
Speech is synthesised in fixed chunks of `AUDIO_CHUNK` consecutive examples (see
`espeak.py` for why the chunk, not the example, is the unit of determinism).

The TFDS builder stores images as raw uint8 arrays and audio as int16 PCM at
`sample_rate`, in array_record files, without TensorFlow.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
import contextlib
import dataclasses
import re

import numpy as np
from PIL import Image
from PIL import ImageDraw
import tensorflow_datasets as tfds

from cmhn_jax.data import audio as audio_lib
from cmhn_jax.data import espeak
from cmhn_jax.data import tfds_base
from cmhn_jax.data import workers

# --- Vocabulary of the world -------------------------------------------------

SHAPES = ("circle", "square", "triangle", "hexagon", "star", "heart", "cross",
          "crescent")
COLOURS = ("red", "orange", "yellow", "green", "cyan", "blue", "purple", "pink")
SIZES = ("small", "medium", "large")
TEXTURES = ("noise", "stripes", "checker", "gradient", "clouds")
# Positions: a 3 x 3 grid, index = 3 * row + col.
ROWS = ("top", "middle", "bottom")
COLS = ("left", "centre", "right")
NUM_CONCEPTS = len(SHAPES) * len(COLOURS)

# Reference colours: saturated, with hues at least 25 degrees apart; the
# backgrounds are nearly grey, so colour can be read back from the pixels.
COLOUR_RGB = {
    "red": (215, 35, 35),
    "orange": (240, 135, 20),
    "yellow": (235, 215, 30),
    "green": (40, 170, 50),
    "cyan": (30, 195, 210),
    "blue": (40, 70, 215),
    "purple": (140, 50, 195),
    "pink": (240, 110, 175),
}

# Words a caption may use. The first word is the plain one, used most often.
SHAPE_WORDS = {
    "circle": ("circle", "disc"),
    "square": ("square", "box"),
    "triangle": ("triangle",),
    "hexagon": ("hexagon",),
    "star": ("star",),
    "heart": ("heart",),
    "cross": ("cross", "plus sign"),
    "crescent": ("crescent", "moon"),
}
COLOUR_WORDS = {
    "red": ("red", "scarlet", "crimson"),
    "orange": ("orange", "amber"),
    "yellow": ("yellow", "golden", "lemon"),
    "green": ("green", "emerald"),
    "cyan": ("cyan", "turquoise", "aqua"),
    "blue": ("blue", "cobalt", "azure"),
    "purple": ("purple", "violet"),
    "pink": ("pink", "rose"),
}
SIZE_WORDS = {
    "small": ("small", "little", "tiny"),
    "medium": ("medium", "medium-sized", "mid-sized"),
    "large": ("large", "big", "huge"),
}
_ROW_WORDS = {0: ("top", "upper"), 2: ("bottom", "lower")}
_COL_WORDS = {0: "left", 2: "right"}
TEMPLATES = (
    "a {size} {colour} {shape} {where}",
    "there is a {size} {colour} {shape} {where}",
    "{where}, a {size} {colour} {shape}",
    "i see a {size} {colour} {shape} {where}",
)
# Probability of the plain word when a synonym exists.
_PLAIN_WORD_P = 0.6

# eSpeak voices: English accents x voice variants.
VOICE_LANGUAGES = ("en", "en-us", "en-gb-x-rp", "en-gb-scotland")
VOICE_VARIANTS = ("", "+m1", "+m2", "+m3", "+m4", "+m5", "+m7", "+f1", "+f2",
                  "+f3", "+f4")

# Geometry, as fractions of the image side.
_CELL_CENTRES = (0.22, 0.5, 0.78)
_POSITION_JITTER = 0.04
_SIZE_RADIUS = {"small": 0.09, "medium": 0.13, "large": 0.17}
_RADIUS_JITTER = 0.08  # relative
_SUPERSAMPLE = 4

AUDIO_CHUNK = 16  # examples whose speech is synthesised by one eSpeak process

SPLITS = ("train", "validation", "test")
_SPLIT_IDS = {"train": 0, "validation": 1, "test": 2}


def concept_id(shape: int, colour: int) -> int:
  return shape * len(COLOURS) + colour


def concept_name(concept: int) -> str:
  shape, colour = divmod(int(concept), len(COLOURS))
  return f"{COLOURS[colour]} {SHAPES[shape]}"


def instance_id(concept: int, size: int, position: int) -> int:
  """Instance-level relevance id: the attributes that a caption states."""
  return (concept * len(SIZES) + size) * 9 + position


def vocabulary() -> list[str]:
  """Every word a caption can contain, sorted (the word tokenizer's vocab)."""
  words = set()
  for table in (SHAPE_WORDS, COLOUR_WORDS, SIZE_WORDS):
    for synonyms in table.values():
      for phrase in synonyms:
        words.update(_words(phrase))
  for row in range(3):
    for col in range(3):
      for phrase in _where_phrases(row, col):
        words.update(_words(phrase))
  for template in TEMPLATES:
    words.update(_words(re.sub(r"\{\w+\}", " ", template)))
  return sorted(words)


def _words(text: str) -> list[str]:
  return re.findall(r"[a-z0-9']+", text.lower())


def _where_phrases(row: int, col: int) -> tuple[str, ...]:
  """Phrases naming cell (row, col) of the 3 x 3 grid."""
  if row != 1 and col != 1:
    phrases = []
    for r in _ROW_WORDS[row]:
      c = _COL_WORDS[col]
      phrases += [f"at the {r} {c}", f"in the {r} {c} corner",
                  f"near the {r} {c} corner"]
    return tuple(phrases)
  if row != 1:
    r = _ROW_WORDS[row][0]
    return (f"at the {r}", f"near the {r} edge", f"at the {r} centre")
  if col != 1:
    c = _COL_WORDS[col]
    return (f"on the {c}", f"at the {c} side", f"near the {c} edge")
  return ("in the centre", "in the middle", "at the centre")


# --- Builder configs -----------------------------------------------------------


@dataclasses.dataclass
class ShapesConfig(tfds.core.BuilderConfig):
  """Size and generation parameters of one `shapes` variant."""

  num_train: int = 64
  num_validation: int = 32
  num_test: int = 32
  image_size: int = 64
  sample_rate: int = 16000
  max_audio_seconds: float = 3.0
  seed: int = 0
  snr_db: tuple[float, float] = (18.0, 30.0)

  def num_examples(self, split: str) -> int:
    return {"train": self.num_train, "validation": self.num_validation,
            "test": self.num_test}[split]

  @property
  def max_audio_samples(self) -> int:
    return int(round(self.max_audio_seconds * self.sample_rate))


BUILDER_CONFIGS = {
    "tiny": ShapesConfig(
        name="tiny", description="A few dozen examples per split, for tests.",
        num_train=64, num_validation=32, num_test=32),
    "default": ShapesConfig(
        name="default", description="The main job's dataset.",
        num_train=8192, num_validation=1024, num_test=1024),
}


def make_config(name: str = "default", **overrides) -> ShapesConfig:
  """Returns builder config `name`, with some fields changed.

  A changed field gives the config a new name (so a different directory on
  disk), e.g. make_config('default', seed=1).name == 'default-seed1'.
  """
  if name not in BUILDER_CONFIGS:
    raise ValueError(
        f"Unknown shapes builder config {name!r}; available: "
        f"{sorted(BUILDER_CONFIGS)}."
    )
  base = BUILDER_CONFIGS[name]
  changed = {k: v for k, v in overrides.items()
             if v is not None and getattr(base, k) != v}
  if not changed:
    return base
  suffix = "-".join(f"{k.replace('_', '')}{v}" for k, v in sorted(changed.items()))
  return dataclasses.replace(base, name=f"{name}-{suffix}", **changed)


# --- One example ---------------------------------------------------------------


def sample_attributes(config: ShapesConfig, split: str, index: int) -> dict:
  """Everything random about example `index` of `split`, as plain values."""
  split_id = _SPLIT_IDS[split]
  block, offset = divmod(index, NUM_CONCEPTS)
  # Concepts are balanced: each block of 64 consecutive examples holds each
  # concept once, in a random order.
  concept = int(np.random.default_rng([config.seed, split_id, 0, block])
                .permutation(NUM_CONCEPTS)[offset])
  rng = np.random.default_rng([config.seed, split_id, 1, index])
  shape, colour = divmod(concept, len(COLOURS))
  size = int(rng.integers(len(SIZES)))
  row, col = (int(v) for v in rng.integers(3, size=2))
  position = 3 * row + col
  attrs = dict(
      index=index, concept=concept, shape=shape, colour=colour, size=size,
      position=position, row=row, col=col,
      **_unstated_attributes(rng, size, row, col),
      audio_seed=int(rng.integers(2**31)),
  )
  attrs["caption"] = _caption(attrs, rng)
  language = VOICE_LANGUAGES[int(rng.integers(len(VOICE_LANGUAGES)))]
  variant = VOICE_VARIANTS[int(rng.integers(len(VOICE_VARIANTS)))]
  attrs["utterance"] = espeak.Utterance(
      text=attrs["caption"], voice=language + variant,
      rate=int(rng.integers(165, 216)), pitch=int(rng.integers(30, 71)),
      pitch_range=int(rng.integers(30, 81)))
  return attrs


def _unstated_attributes(rng: np.random.Generator, size: int, row: int, col: int) -> dict:
  """What the caption leaves open, given its size and grid cell: the exact centre and radius
  (jittered within the cell and the size class), rotation, texture and the pixel noise seed."""
  centre = (
      _CELL_CENTRES[col] + rng.uniform(-_POSITION_JITTER, _POSITION_JITTER),
      _CELL_CENTRES[row] + rng.uniform(-_POSITION_JITTER, _POSITION_JITTER),
  )
  radius = _SIZE_RADIUS[SIZES[size]] * (1 + rng.uniform(-_RADIUS_JITTER, _RADIUS_JITTER))
  return dict(
      centre=(float(centre[0]), float(centre[1])), radius=float(radius),
      rotation=float(rng.uniform(0.0, 360.0)),
      texture=int(rng.integers(len(TEXTURES))),
      image_seed=int(rng.integers(2**31)),
  )


def _pick(rng: np.random.Generator, words: Sequence[str]) -> str:
  if len(words) == 1 or rng.random() < _PLAIN_WORD_P:
    return words[0]
  return words[1 + int(rng.integers(len(words) - 1))]


def _caption(attrs: dict, rng: np.random.Generator) -> str:
  where = _where_phrases(attrs["row"], attrs["col"])
  template = TEMPLATES[int(rng.integers(len(TEMPLATES)))]
  return template.format(
      size=_pick(rng, SIZE_WORDS[SIZES[attrs["size"]]]),
      colour=_pick(rng, COLOUR_WORDS[COLOURS[attrs["colour"]]]),
      shape=_pick(rng, SHAPE_WORDS[SHAPES[attrs["shape"]]]),
      where=where[int(rng.integers(len(where)))],
  )


def parse_caption(caption: str) -> dict:
  """Reads (shape, colour, size, row, col) back from a caption's words."""
  text = f" {caption.lower()} "
  found = {}
  for key, table, names in (("shape", SHAPE_WORDS, SHAPES),
                            ("colour", COLOUR_WORDS, COLOURS),
                            ("size", SIZE_WORDS, SIZES)):
    hits = {names.index(n) for n, words in table.items() for w in words
            if re.search(rf"\b{re.escape(w)}\b", text)}
    found[key] = hits.pop() if len(hits) == 1 else None
  words = set(_words(caption))
  found["row"] = 0 if words & {"top", "upper"} else 2 if words & {"bottom", "lower"} else 1
  found["col"] = 0 if "left" in words else 2 if "right" in words else 1
  return found


def _unit_polygon(shape: str) -> np.ndarray:
  """Outline of `shape` around (0, 0), radius about 1, y pointing down."""
  def regular(n, r=1.0, phase=-np.pi / 2):
    t = phase + 2 * np.pi * np.arange(n) / n
    return np.stack([r * np.cos(t), r * np.sin(t)], -1)
  if shape == "square":
    return regular(4, 1.2, np.pi / 4)
  if shape == "triangle":
    return regular(3, 1.35)
  if shape == "hexagon":
    return regular(6, 1.08)
  if shape == "star":
    outer, inner = regular(5, 1.35), regular(5, 0.55, -np.pi / 2 + np.pi / 5)
    return np.stack([outer, inner], 1).reshape(-1, 2)
  if shape == "heart":
    t = np.linspace(0, 2 * np.pi, 72, endpoint=False)
    x = 16 * np.sin(t) ** 3
    y = -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t))
    return np.stack([x, y + 2.5], -1) / 14.0
  if shape == "cross":
    a, w = 1.15, 0.4
    return np.array([(-w, -a), (w, -a), (w, -w), (a, -w), (a, w), (w, w),
                     (w, a), (-w, a), (-w, w), (-a, w), (-a, -w), (-w, -w)])
  raise ValueError(shape)


def _draw_mask(shape: str, centre, radius: float, rotation: float, size: int):
  """Anti-aliased float mask in [0, 1] of one shape on a size x size canvas."""
  s = _SUPERSAMPLE
  big = Image.new("L", (size * s, size * s), 0)
  draw = ImageDraw.Draw(big)
  cx, cy, r = centre[0] * size * s, centre[1] * size * s, radius * size * s
  theta = np.deg2rad(rotation)
  rot = np.array([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]])
  if shape == "circle":
    draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
  elif shape == "crescent":
    outer, inner, shift = 1.15 * r, 0.95 * r, 0.6 * r
    draw.ellipse([cx - outer, cy - outer, cx + outer, cy + outer], fill=255)
    dx, dy = rot @ np.array([shift, 0.0])
    draw.ellipse([cx + dx - inner, cy + dy - inner, cx + dx + inner,
                  cy + dy + inner], fill=0)
  else:
    points = _unit_polygon(shape) @ rot.T * r + np.array([cx, cy])
    draw.polygon([tuple(p) for p in points], fill=255)
  small = big.resize((size, size), Image.Resampling.BOX)
  return np.asarray(small, np.float32) / 255.0


def _shape_mask(attrs: dict, size: int) -> np.ndarray:
  """The shape's mask, placed so that its centroid is at attrs['centre']."""
  shape = SHAPES[attrs["shape"]]
  args = (attrs["radius"], attrs["rotation"], size)
  mask = _draw_mask(shape, attrs["centre"], *args)
  ys, xs = np.mgrid[0:size, 0:size]
  total = mask.sum()
  # Pixel (i, j) covers [j, j+1) x [i, i+1): its centre is at +0.5.
  centroid = ((mask * (xs + 0.5)).sum() / total / size,
              (mask * (ys + 0.5)).sum() / total / size)
  target = attrs["centre"]
  moved = (2 * target[0] - centroid[0], 2 * target[1] - centroid[1])
  return _draw_mask(shape, moved, *args)


def _background(kind: str, size: int, rng: np.random.Generator) -> np.ndarray:
  """A nearly grey textured background, float32 (size, size, 3) in [0, 255]."""
  grey = rng.uniform(70, 185)
  ys, xs = np.mgrid[0:size, 0:size].astype(np.float32)
  if kind == "noise":
    lum = grey + rng.normal(0, 16, (size, size))
  elif kind == "stripes":
    theta, period = rng.uniform(0, np.pi), rng.uniform(5, 16) * size / 64
    phase = (xs * np.cos(theta) + ys * np.sin(theta)) * 2 * np.pi / period
    lum = grey + rng.uniform(12, 28) * np.sin(phase + rng.uniform(0, 2 * np.pi))
  elif kind == "checker":
    cell = max(2, int(rng.integers(4, 13) * size / 64))
    board = ((xs // cell + ys // cell) % 2) * 2 - 1
    lum = grey + rng.uniform(12, 28) * board
  elif kind == "gradient":
    theta, span = rng.uniform(0, 2 * np.pi), rng.uniform(30, 70)
    ramp = (xs * np.cos(theta) + ys * np.sin(theta)) / size
    lum = grey + span * (ramp - ramp.mean())
  elif kind == "clouds":
    cells = int(rng.integers(3, 8))
    coarse = rng.normal(0, 1, (cells, cells)).astype(np.float32)
    smooth = Image.fromarray(coarse, mode="F").resize(
        (size, size), Image.Resampling.BICUBIC)
    lum = grey + rng.uniform(15, 30) * np.asarray(smooth)
  else:
    raise ValueError(kind)
  lum = lum + rng.normal(0, 5, (size, size))  # film grain
  tint = 1.0 + rng.uniform(-0.06, 0.06, 3)    # low saturation
  return lum[..., None] * tint[None, None, :]


def render_image(attrs: dict, size: int) -> np.ndarray:
  """The example's image, uint8 (size, size, 3)."""
  rng = np.random.default_rng(attrs["image_seed"])
  bg = _background(TEXTURES[attrs["texture"]], size, rng)
  rgb = np.array(COLOUR_RGB[COLOURS[attrs["colour"]]], np.float32)
  rgb = rgb * rng.uniform(0.85, 1.05) + rng.integers(-12, 13, 3)
  fg = rgb[None, None, :] + rng.normal(0, 4, (size, size, 1))
  mask = _shape_mask(attrs, size)[..., None]
  image = bg * (1 - mask) + fg * mask
  return np.clip(np.round(image), 0, 255).astype(np.uint8)


# Attributes a redraw keeps (`redraw_fields`), in this order.
REDRAW_FIELDS = ("shape", "colour", "size", "position", "image_size")


def redraw_fields(record: dict, image_size: int) -> np.ndarray:
  """The int32 vector `redraw_image` needs: what the caption states, and the image side."""
  return np.array([int(record[k]) for k in REDRAW_FIELDS[:-1]] + [int(image_size)], np.int32)


def redraw_image(fields, rng: np.random.Generator) -> np.ndarray:
  """A new image that its example's caption and speech describe just as well (augmentation).

  Keeps what the caption states (shape, colour, size word, grid cell: `REDRAW_FIELDS`) and
  draws afresh from the generator's own distribution everything it leaves open: rotation,
  background texture, pixel noise, the shape's tint, its exact position within the cell and
  its radius within the size class. Unlike crops or flips, which move the shape to another
  cell or mirror "left" into "right", every redraw is a true example of the same caption, so
  instance-level relevance stays meaningful. uint8 (image_size, image_size, 3).
  """
  shape, colour, size, position, image_size = (int(v) for v in fields)
  row, col = divmod(position, 3)
  attrs = dict(shape=shape, colour=colour, **_unstated_attributes(rng, size, row, col))
  return render_image(attrs, image_size)


def finish_audio(wave: np.ndarray, source_rate: int, attrs: dict,
                 config: ShapesConfig) -> np.ndarray:
  """eSpeak's int16 output -> the stored clip: resampled, padded, noisy, int16."""
  rng = np.random.default_rng(attrs["audio_seed"])
  x = wave.astype(np.float32) / 32768.0
  x = audio_lib.resample(x, source_rate, config.sample_rate)
  # Trim eSpeak's own silence, then add a random short lead-in and tail.
  loud = np.nonzero(np.abs(x) > 0.02 * (np.abs(x).max() + 1e-9))[0]
  if loud.size:
    x = x[max(0, loud[0] - 160):loud[-1] + 320]
  lead = int(rng.uniform(0.02, 0.15) * config.sample_rate)
  tail = int(rng.uniform(0.02, 0.10) * config.sample_rate)
  x = np.concatenate([np.zeros(lead, np.float32), x, np.zeros(tail, np.float32)])
  x = x[:config.max_audio_samples]
  x = x * (rng.uniform(0.3, 0.9) / (np.abs(x).max() + 1e-9))
  speech_rms = np.sqrt(np.mean(x[lead:lead + max(1, loud.size)] ** 2) + 1e-12)
  snr = rng.uniform(*config.snr_db)
  # Light background noise: white noise through a one-pole low-pass (brownish).
  white = rng.normal(0, 1, x.shape).astype(np.float32)
  coloured = audio_lib.one_pole_lowpass(white, 0.7)
  coloured *= speech_rms / (np.sqrt(np.mean(coloured ** 2)) + 1e-12) / 10 ** (snr / 20)
  x = np.clip(x + coloured, -1.0, 1.0)
  return np.round(x * 32767).astype(np.int16)


def generate_chunk(config: ShapesConfig, split: str, chunk: int) -> list[dict]:
  """Examples [chunk * AUDIO_CHUNK, ...) of `split`, ready for the TFDS writer."""
  n = config.num_examples(split)
  indices = range(chunk * AUDIO_CHUNK, min(n, (chunk + 1) * AUDIO_CHUNK))
  all_attrs = [sample_attributes(config, split, i) for i in indices]
  # eSpeak runs at 22050 Hz; leave room for resampling to the target rate.
  waves, rate = espeak.synthesize(
      [a["utterance"] for a in all_attrs], seed=config.seed,
      max_samples=int(config.max_audio_seconds * espeak.SAMPLE_RATE * 0.9))
  examples = []
  for attrs, wave in zip(all_attrs, waves):
    u = attrs["utterance"]
    examples.append({
        "image": render_image(attrs, config.image_size),
        "audio": finish_audio(wave, rate, attrs, config),
        "caption": attrs["caption"],
        "index": attrs["index"],
        "concept": attrs["concept"],
        "shape": attrs["shape"],
        "colour": attrs["colour"],
        "size": attrs["size"],
        "position": attrs["position"],
        "texture": attrs["texture"],
        "rotation": np.float32(attrs["rotation"]),
        "centre": np.asarray(attrs["centre"], np.float32),
        "radius": np.float32(attrs["radius"]),
        "voice": u.voice,
        "rate": u.rate,
        "pitch": u.pitch,
    })
  return examples


def generate_split(config: ShapesConfig, split: str,
                   pool: workers.WorkerPool | None = None) -> Iterator[dict]:
  """All examples of `split` in index order; the same with or without `pool`."""
  num_chunks = -(-config.num_examples(split) // AUDIO_CHUNK)
  tasks = [(config, split, c) for c in range(num_chunks)]
  if pool is None:
    for t in tasks:
      yield from generate_chunk(*t)
    return
  for chunk in pool.map_ordered(generate_chunk, tasks):
    yield from chunk


class Shapes(tfds_base.OfflineBuilder):
  """The `shapes` dataset (see the module docstring)."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "First release."}
  BUILDER_CONFIGS = list(BUILDER_CONFIGS.values())

  def __init__(self, *, prepare_workers: int = 0, **kwargs):
    self._prepare_workers = prepare_workers
    self._pool = None
    kwargs.setdefault("file_format", "array_record")
    super().__init__(**kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    c = self.builder_config
    scalar = lambda: tfds.features.Scalar(dtype=np.int32)  # pylint: disable=unnecessary-lambda-assignment
    return tfds.core.DatasetInfo(
        builder=self,
        description=__doc__.split("\n\n")[1],
        disable_shuffling=True,  # record i of a split is example i
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Tensor(
                shape=(c.image_size, c.image_size, 3), dtype=np.uint8,
                encoding=tfds.features.Encoding.BYTES),
            "audio": tfds.features.Tensor(shape=(None,), dtype=np.int16,
                                           encoding=tfds.features.Encoding.BYTES),
            "caption": tfds.features.Text(),
            "index": scalar(),
            "concept": scalar(),
            "shape": scalar(),
            "colour": scalar(),
            "size": scalar(),
            "position": scalar(),
            "texture": scalar(),
            "rotation": tfds.features.Scalar(dtype=np.float32),
            "centre": tfds.features.Tensor(shape=(2,), dtype=np.float32),
            "radius": tfds.features.Scalar(dtype=np.float32),
            "voice": tfds.features.Text(),
            "rate": scalar(),
            "pitch": scalar(),
        }),
        metadata=tfds.core.MetadataDict(
            sample_rate=c.sample_rate,
            max_audio_samples=c.max_audio_samples,
            num_concepts=NUM_CONCEPTS,
            vocabulary=vocabulary(),
            shapes=list(SHAPES), colours=list(COLOURS), sizes=list(SIZES),
            textures=list(TEXTURES),
        ),
    )

  def _download_and_prepare(self, dl_manager, download_config):
    # One pool of worker processes for all splits.
    pool = (workers.WorkerPool(self._prepare_workers)
            if self._prepare_workers > 0 else contextlib.nullcontext())
    with pool as self._pool:
      try:
        super()._download_and_prepare(dl_manager, download_config)
      finally:
        self._pool = None

  def _split_generators(self, dl_manager):
    del dl_manager
    return {split: self._generate_examples(split) for split in SPLITS}

  def _generate_examples(self, split):
    for example in generate_split(self.builder_config, split, self._pool):
      yield example["index"], example
