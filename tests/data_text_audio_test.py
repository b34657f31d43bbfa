"""Tokenizers, audio features and image transforms."""

import os

import jax.numpy as jnp
import numpy as np
import pytest

from cmhn_jax.data import audio
from cmhn_jax.data import image
from cmhn_jax.data import shapes
from cmhn_jax.data import text


def test_word_tokenizer_round_trip(tmp_path):
  tok = text.WordTokenizer(shapes.vocabulary())
  assert tok.pad_id == 0 and tok.vocab_size == len(shapes.vocabulary()) + 2
  config = shapes.make_config("tiny")
  for i in range(200):
    caption = shapes.sample_attributes(config, "validation", i)["caption"]
    ids, mask = tok.encode(caption, 16)
    assert ids.dtype == np.int32 and mask.dtype == bool and ids.shape == (16,)
    assert tok.unk_id not in ids[mask]
    assert tok.decode(ids, mask) == " ".join(text.split_words(caption))
  path = tmp_path / "vocab.txt"
  tok.save(path)
  again = text.WordTokenizer.load(path)
  assert again.itos == tok.itos


def test_word_tokenizer_unknown_truncation_and_counts():
  tok = text.WordTokenizer.from_texts(["a dog", "a cat", "A dog!"], min_count=2)
  assert tok.itos == ["<pad>", "<unk>", "a", "dog"]
  ids, mask = tok.encode("a cat, a dog a dog", 4)
  assert ids.tolist() == [2, 1, 2, 3] and mask.all()
  ids, mask = tok.encode("", 3)
  assert not mask.any() and not ids.any()


def test_hf_tokenizer_from_local_directory(tmp_path):
  from tokenizers import Tokenizer, models, pre_tokenizers  # pylint: disable=g-import-not-at-top
  from transformers import PreTrainedTokenizerFast  # pylint: disable=g-import-not-at-top
  vocab = {"[PAD]": 0, "[UNK]": 1, "a": 2, "red": 3, "circle": 4}
  core = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
  core.pre_tokenizer = pre_tokenizers.Whitespace()
  PreTrainedTokenizerFast(tokenizer_object=core, pad_token="[PAD]",
                          unk_token="[UNK]").save_pretrained(tmp_path)
  tok = text.HFTokenizer(str(tmp_path))
  assert tok.vocab_size == 5 and tok.pad_id == 0
  ids, mask = tok.encode("a red circle", 6)
  assert ids.tolist() == [2, 3, 4, 0, 0, 0] and mask.tolist() == [1, 1, 1, 0, 0, 0]
  assert tok.decode(ids, mask) == "a red circle"
  with pytest.raises(FileNotFoundError, match="local directory"):
    text.HFTokenizer(str(tmp_path / "missing"))


def test_log_mel_numpy_equals_jax():
  rng = np.random.default_rng(0)
  x = rng.normal(0, 0.1, (2, 16000)).astype(np.float32)
  a = audio.log_mel_spectrogram(x, n_mels=40, win_length=400, hop_length=160)
  b = audio.log_mel_spectrogram(jnp.asarray(x), n_mels=40, win_length=400, hop_length=160, xp=jnp)
  assert a.shape == (2, audio.num_frames(16000, 400, 160), 40) == b.shape
  np.testing.assert_allclose(a, np.asarray(b), atol=2e-3)


def test_log_mel_finds_a_tone():
  t = np.arange(16000) / 16000
  feats = []
  for f in (300.0, 3000.0):
    m = audio.log_mel_spectrogram(np.sin(2 * np.pi * f * t), n_mels=40)
    feats.append(m.mean(0).argmax())
  assert feats[0] < feats[1]
  mask = audio.frame_mask(8000, 16000, 400, 320)
  assert mask.sum() == 25 and mask[:25].all()


def test_wav_round_trip_and_resampling(tmp_path):
  t = np.arange(22050) / 22050
  x = 0.5 * np.sin(2 * np.pi * 440 * t)
  path = os.path.join(tmp_path, "a.wav")
  audio.write_wav(path, x, 22050)
  y = audio.read_audio(path, 16000)
  assert y.dtype == np.float32 and abs(len(y) - 16000) <= 1
  spectrum = np.abs(np.fft.rfft(y))
  assert abs(spectrum.argmax() * 16000 / len(y) - 440) < 2
  (tmp_path / "bad.wav").write_bytes(b"not audio")
  with pytest.raises(ValueError, match="bad.wav"):
    audio.read_audio(tmp_path / "bad.wav", 16000)


def test_image_transforms():
  rng = np.random.default_rng(0)
  img = rng.integers(0, 256, (48, 80, 3), dtype=np.uint8)
  centre = image.resize_centre_crop(img, 32)
  assert centre.shape == (32, 32, 3) and centre.dtype == np.uint8
  crop = image.random_resized_crop(img, 32, rng)
  assert crop.shape == (32, 32, 3)
  x = image.normalize(np.full((2, 2, 3), 255, np.uint8), image.CLIP_MEAN, image.CLIP_STD)
  np.testing.assert_allclose(x[0, 0], (1 - np.array(image.CLIP_MEAN)) / image.CLIP_STD, rtol=1e-6)
  with pytest.raises(image.CorruptImageError, match="photo 7"):
    image.decode(b"\xff\xd8garbage", name="photo 7")
