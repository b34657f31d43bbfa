"""COCO captions from the raw files on disk, without TensorFlow.

Expected layout of `raw_dir` (as unpacked from the official COCO archives, plus
Karpathy's split file `dataset_coco.json` from his `caption_datasets.zip`):

    raw_dir/
      annotations/captions_train2014.json   (or captions_train2017.json)
      annotations/captions_val2014.json     (or captions_val2017.json)
      train2014/*.jpg  val2014/*.jpg        (or train2017/, val2017/)
      dataset_coco.json                     (also found under annotations/)

Splits follow Karpathy: `train` = train + restval (113,287 images),
`validation` (5,000), `test` (5,000), the standard 5k-test retrieval protocol.
Karpathy's file names the 2014 images by COCO id, so the 2017 folders (same
images, other names) work too. One record per image holds its encoded image
bytes (stored as they are, not re-encoded) and its first five captions (by
annotation id), so the five captions of an image stay together. The records
have the same keys as TFDS's `coco_captions`, so one reader serves both.

`write_fake_coco` writes a small tree of this layout, for tests and benchmarks.
"""

from __future__ import annotations

import collections
import json
import os

import numpy as np
from PIL import Image
import tensorflow_datasets as tfds

from cmhn_jax.data import image as image_lib
from cmhn_jax.data import text as text_lib
from cmhn_jax.data import tfds_base

CAPTIONS_PER_IMAGE = 5
KARPATHY_FILE = "dataset_coco.json"
_KARPATHY_SPLITS = {"train": "train", "restval": "train", "val": "validation",
                    "test": "test"}
SPLITS = ("train", "validation", "test")


def required_files(raw_dir: str, year: str) -> list[str]:
  return [
      os.path.join(raw_dir, "annotations", f"captions_train{year}.json"),
      os.path.join(raw_dir, "annotations", f"captions_val{year}.json"),
      os.path.join(raw_dir, f"train{year}"),
      os.path.join(raw_dir, f"val{year}"),
  ]


def find_karpathy(raw_dir: str, karpathy_json: str = "") -> str | None:
  candidates = [karpathy_json] if karpathy_json else [
      os.path.join(raw_dir, KARPATHY_FILE),
      os.path.join(raw_dir, "annotations", KARPATHY_FILE)]
  for c in candidates:
    if os.path.isfile(c):
      return c
  return None


def detect_year(raw_dir: str) -> str:
  for year in ("2014", "2017"):
    if all(os.path.exists(p) for p in required_files(raw_dir, year)[:2]):
      return year
  return "2014"


def check_raw_dir(raw_dir: str, year: str, karpathy_json: str = "") -> None:
  """Raises FileNotFoundError listing every missing file of the raw layout."""
  if not raw_dir or not os.path.isdir(raw_dir):
    raise FileNotFoundError(
        f"COCO raw directory {raw_dir!r} does not exist. Set `raw_dir` to a "
        "folder holding the unpacked COCO 2014 or 2017 caption annotations and "
        f"images plus Karpathy's {KARPATHY_FILE}:\n" + __doc__.split("\n\n")[1])
  missing = [p for p in required_files(raw_dir, year) if not os.path.exists(p)]
  if find_karpathy(raw_dir, karpathy_json) is None:
    missing.append(karpathy_json or os.path.join(raw_dir, KARPATHY_FILE))
  if missing:
    raise FileNotFoundError(
        f"COCO raw directory {raw_dir} ({year}) is missing:\n  "
        + "\n  ".join(missing)
        + f"\n(Karpathy's split file {KARPATHY_FILE} comes from his "
        "caption_datasets.zip; it may also sit in annotations/.)")


def _load_json(path: str):
  with open(path, encoding="utf-8") as f:
    return json.load(f)


def read_index(raw_dir: str, year: str, karpathy_json: str = "") -> dict:
  """Split name -> list of (image path, coco id, captions), in Karpathy order."""
  check_raw_dir(raw_dir, year, karpathy_json)
  by_id = {}  # coco id -> (folder, file name)
  captions = collections.defaultdict(list)  # coco id -> [(annotation id, text)]
  for part in ("train", "val"):
    ann = _load_json(os.path.join(raw_dir, "annotations",
                                  f"captions_{part}{year}.json"))
    for img in ann["images"]:
      by_id[int(img["id"])] = (f"{part}{year}", img["file_name"])
    for a in ann["annotations"]:
      captions[int(a["image_id"])].append((int(a["id"]), a["caption"].strip()))
  karpathy = _load_json(find_karpathy(raw_dir, karpathy_json))
  listings = {}
  index = {s: [] for s in SPLITS}
  missing = []
  for img in karpathy["images"]:
    split = _KARPATHY_SPLITS.get(img["split"])
    if split is None:
      continue
    coco_id = int(img["cocoid"])
    if coco_id not in by_id or not captions.get(coco_id):
      missing.append(f"annotations of COCO image id {coco_id}")
      continue
    folder, name = by_id[coco_id]
    if folder not in listings:
      listings[folder] = set(os.listdir(os.path.join(raw_dir, folder)))
    if name not in listings[folder]:
      missing.append(os.path.join(raw_dir, folder, name))
      continue
    texts = [t for _, t in sorted(captions[coco_id])]
    index[split].append((os.path.join(raw_dir, folder, name), coco_id, texts))
  if missing:
    raise FileNotFoundError(
        f"COCO raw directory {raw_dir} lacks {len(missing)} files named by "
        f"{KARPATHY_FILE}, e.g.:\n  " + "\n  ".join(missing[:20]))
  return index


class CocoRaw(tfds_base.OfflineBuilder):
  """COCO captions prepared from the raw files (see the module docstring)."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "First release."}
  BUILDER_CONFIGS = [
      tfds.core.BuilderConfig(name="2014", description="COCO 2014 files."),
      tfds.core.BuilderConfig(name="2017", description="COCO 2017 files."),
  ]

  def __init__(self, *, raw_dir: str = "", karpathy_json: str = "",
               check_images: bool = True, **kwargs):
    self._raw_dir = os.path.expanduser(raw_dir)
    self._karpathy_json = karpathy_json
    self._check_images = check_images
    kwargs.setdefault("file_format", "array_record")
    super().__init__(**kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description="COCO captions, Karpathy splits, 5 captions per image.",
        disable_shuffling=True,
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Tensor(shape=(), dtype=np.object_),
            "image/filename": tfds.features.Text(),
            "image/id": np.int64,
            "captions": tfds.features.Sequence({
                "id": np.int64, "text": tfds.features.Text()}),
        }),
        metadata=tfds.core.MetadataDict(),
    )

  def _split_generators(self, dl_manager):
    del dl_manager
    index = read_index(self._raw_dir, self.builder_config.name,
                       self._karpathy_json)
    counts = collections.Counter(
        w for _, _, texts in index["train"]
        for t in texts[:CAPTIONS_PER_IMAGE] for w in text_lib.split_words(t))
    self.info.metadata["word_counts"] = dict(sorted(counts.items()))
    self.info.metadata["captions_per_image"] = CAPTIONS_PER_IMAGE
    return {s: self._generate_examples(index[s]) for s in SPLITS}

  def _generate_examples(self, items):
    for i, (path, coco_id, texts) in enumerate(items):
      with open(path, "rb") as f:
        data = f.read()
      if self._check_images:
        image_lib.check_header(data, name=path)
      # Keep five captions; an image with fewer (none in COCO) repeats them.
      texts = [texts[k % len(texts)] for k in range(CAPTIONS_PER_IMAGE)]
      yield i, {
          "image": data,
          "image/filename": os.path.basename(path),
          "image/id": coco_id,
          "captions": [{"id": coco_id * 10 + k, "text": t}
                       for k, t in enumerate(texts)],
      }


_FAKE_WORDS = ("dog", "cat", "man", "woman", "bus", "pizza", "table", "street",
               "red", "small", "big", "sitting", "standing", "on", "near", "a",
               "the", "with", "of", "two", "grass", "kitchen")


def write_fake_coco(root: str, *, year: str = "2014", num_train: int = 6,
                    num_restval: int = 2, num_val: int = 3, num_test: int = 3,
                    image_size: tuple[int, int] = (64, 48), seed: int = 0) -> str:
  """Writes a small COCO-layout tree under `root` (see module docstring).

  Image i of the tree is a noisy picture whose mean colour depends on i; its
  captions are random words. Returns `root`.
  """
  rng = np.random.default_rng(seed)
  os.makedirs(os.path.join(root, "annotations"), exist_ok=True)
  plan = (["train"] * num_train + ["restval"] * num_restval + ["val"] * num_val
          + ["test"] * num_test)
  anns = {"train": {"images": [], "annotations": []},
          "val": {"images": [], "annotations": []}}
  karpathy = []
  for i, ksplit in enumerate(plan):
    coco_id = 1000 + 7 * i
    part = "train" if ksplit == "train" else "val"
    name = (f"COCO_{part}{year}_{coco_id:012d}.jpg" if year == "2014"
            else f"{coco_id:012d}.jpg")
    folder = os.path.join(root, f"{part}{year}")
    os.makedirs(folder, exist_ok=True)
    w, h = image_size
    base = np.array([(37 * i) % 256, (91 * i) % 256, (53 * i) % 256])
    pixels = np.clip(base + rng.normal(0, 20, (h, w, 3)), 0, 255).astype(np.uint8)
    Image.fromarray(pixels).save(os.path.join(folder, name), quality=90)
    anns[part]["images"].append(
        {"id": coco_id, "file_name": name, "height": h, "width": w})
    n_caps = 5 + (i % 3 == 0)  # some images have 6 captions, as in COCO
    sentences = []
    for k in range(n_caps):
      words = rng.choice(_FAKE_WORDS, size=int(rng.integers(4, 9)))
      caption = f"image {i} " + " ".join(words)
      anns[part]["annotations"].append(
          {"image_id": coco_id, "id": 50000 + 10 * i + k, "caption": caption})
      sentences.append({"raw": caption, "tokens": caption.split()})
    karpathy.append({"filepath": f"{part}2014", "filename": name,
                     "cocoid": coco_id, "split": ksplit, "sentences": sentences})
  for part, content in anns.items():
    with open(os.path.join(root, "annotations", f"captions_{part}{year}.json"),
              "w", encoding="utf-8") as f:
      json.dump(content, f)
  with open(os.path.join(root, KARPATHY_FILE), "w", encoding="utf-8") as f:
    json.dump({"images": karpathy, "dataset": "coco"}, f)
  return root
