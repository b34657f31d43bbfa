"""Audio: reading files, resampling, log-mel features (numpy or JAX).

`log_mel_spectrogram` is written once against the array API shared by numpy and
jax.numpy (pass `xp=jnp` to run it on device inside a jitted model, e.g. for
waveform inputs); the input pipeline uses numpy.
"""

from __future__ import annotations

import functools
import io
import math
import os
import wave as wave_lib

import numpy as np
from scipy import signal

# Log-mel scaling as in Whisper (Radford et al., 2022): log10 of the power,
# floored at 8 decades below the utterance's peak, then (x + 4) / 4 so that
# typical values fall in about [-1, 1].
_LOG_FLOOR_DECADES = 8.0


def resample(x: np.ndarray, rate_in: int, rate_out: int) -> np.ndarray:
  """Polyphase resampling of a float waveform (last axis)."""
  if rate_in == rate_out:
    return np.asarray(x, np.float32)
  g = math.gcd(int(rate_in), int(rate_out))
  up, down = rate_out // g, rate_in // g
  y = signal.resample_poly(np.asarray(x, np.float64), up, down, axis=-1,
                           window=_resample_filter(up, down))
  return y.astype(np.float32)


@functools.lru_cache(maxsize=8)
def _resample_filter(up: int, down: int) -> np.ndarray:
  """resample_poly's own default anti-aliasing filter, designed once."""
  max_rate = max(up, down)
  half_len = 10 * max_rate
  return signal.firwin(2 * half_len + 1, 1.0 / max_rate, window=("kaiser", 5.0))


def one_pole_lowpass(x: np.ndarray, a: float) -> np.ndarray:
  """y[t] = a * y[t-1] + (1 - a) * x[t]: white noise -> a darker noise."""
  y = signal.lfilter([1.0 - a], [1.0, -a], np.asarray(x, np.float64))
  return y.astype(np.float32)


def read_audio(path: str | os.PathLike, sample_rate: int) -> np.ndarray:
  """Reads an audio file as mono float32 in [-1, 1] at `sample_rate`.

  WAV (8/16/24/32-bit PCM) is read with the standard library. Other formats
  (FLAC, OGG, MP3: LibriSpeech, Clotho, AudioCaps) need the optional `soundfile`
  package.
  """
  path = os.fspath(path)
  with open(path, "rb") as f:
    data = f.read()
  try:
    x, rate = _decode_wav(data)
  except (wave_lib.Error, EOFError, ValueError) as wav_error:
    try:
      import soundfile  # pylint: disable=g-import-not-at-top
    except ImportError:
      raise ValueError(
          f"Cannot read audio file {path}: not a PCM WAV file ({wav_error}). "
          "For FLAC/OGG/MP3 install the optional `soundfile` package "
          "(`pip install soundfile`)."
      ) from wav_error
    try:
      x, rate = soundfile.read(io.BytesIO(data), dtype="float32", always_2d=True)
    except Exception as e:  # soundfile raises its own error types.
      raise ValueError(f"Cannot read audio file {path}: {e}") from e
    x = x.T
  x = np.asarray(x, np.float32).mean(axis=0)
  return resample(x, rate, sample_rate)


def _decode_wav(data: bytes) -> tuple[np.ndarray, int]:
  """(channels, samples) float32 and the rate of a PCM WAV file's bytes."""
  with wave_lib.open(io.BytesIO(data), "rb") as w:
    channels, width, rate = w.getnchannels(), w.getsampwidth(), w.getframerate()
    raw = w.readframes(w.getnframes())
  if width == 1:
    x = (np.frombuffer(raw, np.uint8).astype(np.float32) - 128) / 128
  elif width == 2:
    x = np.frombuffer(raw, "<i2").astype(np.float32) / 32768
  elif width == 3:
    b = np.frombuffer(raw, np.uint8).reshape(-1, 3).astype(np.int32)
    v = b[:, 0] | (b[:, 1] << 8) | (b[:, 2] << 16)
    x = (np.where(v >= 1 << 23, v - (1 << 24), v)).astype(np.float32) / (1 << 23)
  elif width == 4:
    x = np.frombuffer(raw, "<i4").astype(np.float32) / (1 << 31)
  else:
    raise ValueError(f"unsupported WAV sample width {width}")
  return x.reshape(-1, channels).T, rate


def write_wav(path: str | os.PathLike, x: np.ndarray, sample_rate: int) -> None:
  """Writes a mono float waveform in [-1, 1] as 16-bit PCM WAV."""
  pcm = np.round(np.clip(np.asarray(x, np.float32), -1, 1) * 32767).astype("<i2")
  with wave_lib.open(os.fspath(path), "wb") as w:
    w.setnchannels(1)
    w.setsampwidth(2)
    w.setframerate(int(sample_rate))
    w.writeframes(pcm.tobytes())


def num_frames(num_samples: int, win_length: int, hop_length: int) -> int:
  """Frames of `log_mel_spectrogram` for a clip of `num_samples` (>= 1)."""
  return 1 + max(0, num_samples - win_length) // hop_length


def frame_mask(valid_samples, total_samples: int, win_length: int,
               hop_length: int) -> np.ndarray:
  """Bool mask over frames: a frame is valid if it starts inside the signal."""
  frames = num_frames(total_samples, win_length, hop_length)
  starts = np.arange(frames) * hop_length
  valid = np.asarray(valid_samples)[..., None]
  return (starts < valid) & (valid > 0)


@functools.lru_cache(maxsize=16)
def mel_filterbank(sample_rate: int, n_fft: int, n_mels: int,
                   f_min: float = 0.0, f_max: float | None = None) -> np.ndarray:
  """(n_fft // 2 + 1, n_mels) triangular filters on the HTK mel scale.

  Each filter is area-normalised (Slaney), so loudness does not depend on the
  filter's width.
  """
  f_max = sample_rate / 2 if f_max is None else f_max
  mel = lambda f: 2595.0 * np.log10(1.0 + f / 700.0)  # pylint: disable=unnecessary-lambda-assignment
  hz = lambda m: 700.0 * (10 ** (m / 2595.0) - 1.0)  # pylint: disable=unnecessary-lambda-assignment
  edges = hz(np.linspace(mel(f_min), mel(f_max), n_mels + 2))
  freqs = np.linspace(0, sample_rate / 2, n_fft // 2 + 1)
  lower, centre, upper = edges[:-2], edges[1:-1], edges[2:]
  up = (freqs[:, None] - lower) / (centre - lower)
  down = (upper - freqs[:, None]) / (upper - centre)
  weights = np.maximum(0, np.minimum(up, down))
  weights *= 2.0 / (upper - lower)
  return weights.astype(np.float32)


def log_mel_spectrogram(waveform, *, sample_rate: int = 16000, n_mels: int = 40,
                        win_length: int = 400, hop_length: int = 320,
                        n_fft: int | None = None, xp=np):
  """Log-mel spectrogram of waveform(s) (..., S) -> (..., T, n_mels).

  Frames are not centred: frame t covers samples [t * hop, t * hop + win), and
  T = num_frames(S, win_length, hop_length). Scaling as in Whisper: log10 of
  the mel power, floored 8 decades below the clip's maximum, then (x + 4) / 4.

  Args:
    waveform: float array (..., S) in [-1, 1] (numpy or jax).
    sample_rate, n_mels, win_length, hop_length: analysis parameters.
    n_fft: FFT size, at least win_length; default: win_length (zero-padding
      to a power of two costs more than it saves with pocketfft).
    xp: the array module, `numpy` (default) or `jax.numpy`.
  """
  n_fft = n_fft or win_length
  waveform = xp.asarray(waveform, dtype=xp.float32)
  length = waveform.shape[-1]
  if length < win_length:
    pad = [(0, 0)] * (waveform.ndim - 1) + [(0, win_length - length)]
    waveform = xp.pad(waveform, pad)
    length = win_length
  frames = num_frames(length, win_length, hop_length)
  window = np.hanning(win_length + 1)[:-1].astype(np.float32)  # periodic Hann
  if xp is np:  # a strided view: no gathered copy of every frame
    view = np.lib.stride_tricks.sliding_window_view(waveform, win_length, axis=-1)
    segments = view[..., ::hop_length, :][..., :frames, :] * window
  else:
    idx = np.arange(frames)[:, None] * hop_length + np.arange(win_length)[None, :]
    segments = waveform[..., idx] * window
  power = xp.abs(xp.fft.rfft(segments, n=n_fft, axis=-1)) ** 2
  # One 2-D GEMM: numpy runs (..., T, F) @ (F, M) as one small GEMM per
  # leading index, 70x slower for a batch.
  fb = xp.asarray(mel_filterbank(sample_rate, n_fft, n_mels))
  mel = xp.reshape(xp.reshape(power, (-1, power.shape[-1])) @ fb,
                   power.shape[:-1] + (n_mels,))
  log_mel = xp.log10(xp.maximum(mel, 1e-10))
  peak = xp.max(log_mel, axis=(-2, -1), keepdims=True)
  log_mel = xp.maximum(log_mel, peak - _LOG_FLOOR_DECADES)
  return ((log_mel + 4.0) / 4.0).astype(xp.float32)
