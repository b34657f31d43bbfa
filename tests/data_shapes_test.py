"""The `shapes` dataset: determinism, splits, and what its pixels, captions and
speech say about each other."""

import filecmp
import glob
import hashlib
import os
import sys

import numpy as np
import pytest

from cmhn_jax import data
from cmhn_jax.data import espeak
from cmhn_jax.data import shapes
from cmhn_jax.data import sources
from cmhn_jax.data import text as text_lib


def _records(cfg, split):
  ds = sources.open_dataset(cfg)
  return sources.split_records(ds.builder, split)


def _all(records):
  return [records[i] for i in range(len(records))]


def test_concepts_and_grammar():
  assert len(shapes.SHAPES) >= 8 and len(shapes.COLOURS) >= 8
  assert shapes.NUM_CONCEPTS == 64
  vocab = set(shapes.vocabulary())
  for colour, words in shapes.COLOUR_WORDS.items():
    assert colour in words
  # Captions of any example parse back to its attributes, in the vocabulary.
  config = shapes.make_config("tiny")
  for i in range(300):
    a = shapes.sample_attributes(config, "train", i)
    assert set(text_lib.split_words(a["caption"])) <= vocab
    parsed = shapes.parse_caption(a["caption"])
    assert parsed == {k: a[k] for k in ("shape", "colour", "size", "row", "col")}, a["caption"]


def test_concepts_are_balanced_per_block():
  config = shapes.make_config("tiny")
  concepts = [shapes.sample_attributes(config, "test", i)["concept"] for i in range(128)]
  assert sorted(concepts[:64]) == list(range(64))
  assert sorted(concepts[64:]) == list(range(64))


def test_same_seed_same_bytes_any_worker_count(shapes_tiny_config, tmp_path):
  """Preparing again, with 2 worker processes, writes identical files."""
  cfg = shapes_tiny_config.copy_and_resolve_references()
  cfg.data_dir = str(tmp_path)
  cfg.prepare_workers = 2
  data.prepare(cfg)
  first = os.path.join(shapes_tiny_config.data_dir, "shapes", "tiny", "1.0.0")
  second = os.path.join(cfg.data_dir, "shapes", "tiny", "1.0.0")
  files = sorted(os.path.basename(p) for p in glob.glob(os.path.join(first, "*array_record*")))
  assert len(files) == 3
  match, mismatch, errors = filecmp.cmpfiles(first, second, files + ["features.json"], shallow=False)
  assert not mismatch and not errors, (mismatch, errors)
  # A different seed gives different data, in its own directory.
  other = shapes.make_config("tiny", seed=1)
  assert other.name != "tiny"
  a = shapes.generate_chunk(other, "train", 0)[0]
  b = shapes.generate_chunk(shapes.make_config("tiny"), "train", 0)[0]
  assert not np.array_equal(a["image"], b["image"])


def test_prepare_is_idempotent(shapes_tiny_config):
  path = os.path.join(shapes_tiny_config.data_dir, "shapes", "tiny", "1.0.0")
  stamps = {p: os.stat(p).st_mtime_ns for p in glob.glob(os.path.join(path, "*"))}
  data.prepare(shapes_tiny_config)
  assert stamps == {p: os.stat(p).st_mtime_ns for p in glob.glob(os.path.join(path, "*"))}


def test_splits_are_disjoint(shapes_tiny_config):
  seen = {}
  for split in shapes.SPLITS:
    records = _all(_records(shapes_tiny_config, split))
    assert len(records) == shapes.make_config("tiny").num_examples(split)
    hashes = {hashlib.sha1(r["image"].tobytes()).hexdigest() for r in records}
    assert len(hashes) == len(records)
    for other, h in seen.items():
      assert not hashes & h, (split, other)
    seen[split] = hashes


def _hue(rgb):
  r, g, b = (np.asarray(rgb, np.float64) / 255).T
  mx, mn = np.max([r, g, b], 0), np.min([r, g, b], 0)
  d = mx - mn + 1e-9
  h = np.where(mx == r, ((g - b) / d) % 6, np.where(mx == g, (b - r) / d + 2, (r - g) / d + 4))
  return 60 * h, d / (mx + 1e-9)


_REF_HUES = {c: float(_hue(np.array([rgb]))[0][0]) for c, rgb in shapes.COLOUR_RGB.items()}


def _foreground(img):
  """The saturated (shape) pixels of an image, as a flat bool mask, and their hues."""
  img = img.astype(np.float64)
  hue, sat = _hue(img.reshape(-1, 3))
  return (sat > 0.4) & (img.reshape(-1, 3).max(1) > 60), hue


def _assert_caption_matches_pixels(caption, img):
  """The caption's colour word names the colour of the saturated pixels, and its position
  words name the grid cell of their centroid."""
  parsed = shapes.parse_caption(caption)
  fg, hue = _foreground(img)
  assert fg.sum() >= 20, caption
  # Colour: the mean hue of the shape's pixels, nearest reference hue.
  mean_hue = np.degrees(np.angle(np.exp(1j * np.radians(hue[fg])).mean())) % 360
  dist = {c: min(abs(mean_hue - h), 360 - abs(mean_hue - h)) for c, h in _REF_HUES.items()}
  assert min(dist, key=dist.get) == shapes.COLOURS[parsed["colour"]], caption
  # Position: the cell of the centroid of those pixels.
  size = img.shape[0]
  ys, xs = np.divmod(np.nonzero(fg)[0], size)
  col, row = int(3 * xs.mean() / size), int(3 * ys.mean() / size)
  assert (row, col) == (parsed["row"], parsed["col"]), caption


@pytest.mark.parametrize("split", ["train", "test"])
def test_caption_matches_pixels(shapes_tiny_config, split):
  for r in _all(_records(shapes_tiny_config, split)):
    caption = r["caption"].decode()
    _assert_caption_matches_pixels(caption, r["image"])
    assert int(r["size"]) == shapes.parse_caption(caption)["size"]


def test_redraw_is_a_new_image_of_the_same_caption(shapes_tiny_config):
  """A redraw keeps the caption true (colour, cell, size class, shape) and changes the rest."""
  areas = {0: [], 1: [], 2: []}
  for r in _all(_records(shapes_tiny_config, "train"))[:24]:
    caption = r["caption"].decode()
    fields = shapes.redraw_fields(r, r["image"].shape[0])
    a = shapes.redraw_image(fields, np.random.default_rng(0))
    b = shapes.redraw_image(fields, np.random.default_rng(1))
    assert a.shape == b.shape == r["image"].shape and a.dtype == np.uint8
    np.testing.assert_array_equal(a, shapes.redraw_image(fields, np.random.default_rng(0)))
    assert not np.array_equal(a, b) and not np.array_equal(a, r["image"])
    for img in (a, b):
      _assert_caption_matches_pixels(caption, img)
      areas[int(r["size"])].append(_foreground(img)[0].sum())
  means = [np.mean(areas[s]) for s in range(3)]
  assert means[0] < means[1] < means[2], means


def test_redraw_with_the_records_own_unstated_attributes_is_the_record(shapes_tiny_config,
                                                                      monkeypatch):
  """What a redraw keeps (`redraw_fields`) plus what it resamples is the whole image: given
  the record's own rotation, centre, radius, texture and noise seed, it redraws the record
  byte for byte (so it keeps the shape, not only what the pixel checks above can see)."""
  config = shapes.make_config("tiny")
  for r in _all(_records(shapes_tiny_config, "train"))[:8]:
    a = shapes.sample_attributes(config, "train", int(r["index"]))
    own = {k: a[k] for k in ("centre", "radius", "rotation", "texture", "image_seed")}
    fields = shapes.redraw_fields(r, r["image"].shape[0])
    with monkeypatch.context() as m:  # undone before the next record's `sample_attributes`
      m.setattr(shapes, "_unstated_attributes", lambda *_, own=own: own)
      redrawn = shapes.redraw_image(fields, np.random.default_rng(0))
    np.testing.assert_array_equal(redrawn, r["image"])


def test_bigger_words_bigger_shapes(shapes_tiny_config):
  areas = {0: [], 1: [], 2: []}
  for r in _all(_records(shapes_tiny_config, "train")):
    _, sat = _hue(r["image"].reshape(-1, 3))
    areas[shapes.parse_caption(r["caption"].decode())["size"]].append((sat > 0.4).sum())
  means = [np.mean(areas[s]) for s in range(3)]
  assert means[0] < means[1] < means[2], means


def test_audio_is_speech_of_plausible_length(shapes_tiny_config):
  records = _all(_records(shapes_tiny_config, "train"))
  config = shapes.make_config("tiny")
  durations, words = [], []
  for r in records:
    x = r["audio"].astype(np.float32) / 32768
    assert x.dtype == np.float32 and 0 < len(x) <= config.max_audio_samples
    durations.append(len(x) / config.sample_rate)
    words.append(len(text_lib.split_words(r["caption"].decode())))
    # Loud enough, and not noise: 20 ms frames' energy has a wide dynamic range
    # (syllables and gaps), and the noise floor is well below the speech.
    frames = x[: len(x) // 320 * 320].reshape(-1, 320)
    energy = 10 * np.log10((frames ** 2).mean(1) + 1e-12)
    assert np.abs(x).max() > 0.2
    assert np.percentile(energy, 90) - np.percentile(energy, 10) > 15
    active = (energy > energy.max() - 30).mean()
    assert 0.4 < active <= 1.0
  assert 1.0 <= min(durations) and max(durations) <= config.max_audio_seconds
  # Longer captions take longer to say.
  assert np.corrcoef(durations, words)[0, 1] > 0.3


def test_speech_is_deterministic_per_call():
  u = [espeak.Utterance("a small red circle", voice="en+f2"),
       espeak.Utterance("a big blue star", voice="en-us", rate=200)]
  (a, b), rate = espeak.synthesize(u, seed=3)
  (a2, b2), _ = espeak.synthesize(u, seed=3)
  assert rate == 22050 and len(a) > 0.5 * rate
  np.testing.assert_array_equal(a, a2)
  np.testing.assert_array_equal(b, b2)


def test_missing_espeak_says_what_to_install(monkeypatch):
  monkeypatch.setitem(sys.modules, "espeakng_loader", None)
  with pytest.raises(espeak.EspeakUnavailableError, match="pip install espeakng-loader"):
    espeak.synthesize([espeak.Utterance("hello")])


def test_unknown_builder_config():
  with pytest.raises(ValueError, match="tiny"):
    shapes.make_config("huge")
