"""Images: decoding, resizing / cropping and normalisation (numpy + PIL)."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

# CLIP's normalisation (Radford et al., 2021), for pretrained encoders.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class CorruptImageError(ValueError):
  """An image that cannot be decoded; the message names its file or record."""


def decode(data: bytes, *, name: str, min_size: int | None = None) -> Image.Image:
  """Decodes encoded image bytes to an RGB PIL image.

  Args:
    data: JPEG / PNG / ... bytes.
    name: what to call the image in errors (file name or record).
    min_size: if given, lets the JPEG decoder downscale by a power of two while
      keeping both sides >= min_size (much faster for big photos).
  """
  try:
    img = Image.open(io.BytesIO(data))
    if min_size is not None and img.format == "JPEG":
      img.draft("RGB", (min_size, min_size))
    return img.convert("RGB")
  except Exception as e:  # PIL raises many types for bad data.
    raise CorruptImageError(f"Cannot decode image {name}: {e}") from e


def check_header(data: bytes, *, name: str) -> None:
  """Cheap validity check (format and size) without decoding the pixels."""
  try:
    with Image.open(io.BytesIO(data)) as img:
      img.verify()
  except Exception as e:
    raise CorruptImageError(f"Cannot read image {name}: {e}") from e


def _as_pil(img) -> Image.Image:
  return img if isinstance(img, Image.Image) else Image.fromarray(np.asarray(img))


def resize_centre_crop(img, size: int) -> np.ndarray:
  """Eval transform: shorter side to `size`, then the central size x size crop."""
  img = _as_pil(img)
  w, h = img.size
  if (w, h) == (size, size):
    return np.asarray(img, np.uint8)
  scale = size / min(w, h)
  nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
  img = img.resize((nw, nh), Image.Resampling.BICUBIC, reducing_gap=3.0)
  left, top = (nw - size) // 2, (nh - size) // 2
  return np.asarray(img.crop((left, top, left + size, top + size)), np.uint8)


def random_resized_crop(img, size: int, rng: np.random.Generator,
                        scale=(0.5, 1.0), ratio=(3 / 4, 4 / 3)) -> np.ndarray:
  """Train transform (Szegedy et al., 2015): a random crop covering `scale` of
  the area with aspect ratio in `ratio`, resized to size x size."""
  img = _as_pil(img)
  w, h = img.size
  area = w * h
  log_ratio = np.log(ratio)
  for _ in range(10):
    target = area * rng.uniform(*scale)
    aspect = np.exp(rng.uniform(*log_ratio))
    cw = int(round(np.sqrt(target * aspect)))
    ch = int(round(np.sqrt(target / aspect)))
    if 0 < cw <= w and 0 < ch <= h:
      left = int(rng.integers(0, w - cw + 1))
      top = int(rng.integers(0, h - ch + 1))
      break
  else:  # fall back to a central crop
    cw = ch = min(w, h)
    left, top = (w - cw) // 2, (h - ch) // 2
  crop = img.crop((left, top, left + cw, top + ch))
  return np.asarray(crop.resize((size, size), Image.Resampling.BICUBIC,
                                reducing_gap=3.0), np.uint8)


def normalize(img: np.ndarray, mean, std) -> np.ndarray:
  """uint8 (H, W, 3) -> float32 (x / 255 - mean) / std."""
  x = np.asarray(img, np.float32) * (1.0 / 255.0)
  return (x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
