"""Speech synthesis with eSpeak NG through the `espeakng-loader` wheel (ctypes).

The wheel ships `libespeak-ng.so` and its voice data, so no system package is
needed. We talk to the C API directly (`speak_lib.h`) in synchronous mode.

Determinism. eSpeak NG keeps static state between utterances inside the library
(the same call made twice in one process gives different samples, even with
`espeak_ng_SetRandSeed` before each call), but a *fresh* copy of the library
replaying the same sequence of calls produces the same bytes. So every call to
`synthesize` forks a child process that loads the library, synthesises the
given utterances in order and sends the samples back through a pipe. The output
of a call therefore depends only on its arguments, never on what was spoken
before or in which worker process. The calling process never loads the library
itself (keep it that way: a copy loaded in the parent would be inherited, dirty,
by every child).

Forking from a process that runs threads (JAX, grain) is safe here because the
child only touches ctypes, numpy and a pipe, then leaves with `os._exit`.
"""

from __future__ import annotations

from collections.abc import Sequence
import ctypes
import dataclasses
import os
import struct

import numpy as np

INSTALL_HINT = (
    "eSpeak NG is not available: install the `espeakng-loader` wheel "
    "(`pip install espeakng-loader`), which bundles libespeak-ng and its voice "
    "data; no system package is needed."
)

# speak_lib.h constants.
_AUDIO_OUTPUT_SYNCHRONOUS = 2
_ESPEAK_INITIALIZE_DONT_EXIT = 0x8000
_POS_CHARACTER = 1
_ESPEAK_CHARS_UTF8 = 1
_PARAM_RATE = 1
_PARAM_VOLUME = 2
_PARAM_PITCH = 3
_PARAM_RANGE = 4
_PARAM_WORDGAP = 7

# If an utterance comes out longer than `max_samples`, it is spoken again this
# much faster, at most `_MAX_RETRIES` times, then truncated.
_SPEEDUP = 1.25
_MAX_RETRIES = 3


class EspeakUnavailableError(RuntimeError):
  """libespeak-ng (from the `espeakng-loader` wheel) cannot be found or loaded."""


@dataclasses.dataclass(frozen=True)
class Utterance:
  """One piece of text and the voice that speaks it.

  Attributes:
    text: what to say (UTF-8).
    voice: an eSpeak voice name, optionally with a variant: 'en', 'en-us+f2'.
    rate: words per minute (eSpeak accepts 80..450).
    pitch: base pitch, 0..100.
    pitch_range: pitch variation, 0..100 (0 is monotone).
    word_gap: extra pause between words, in units of 10 ms.
  """

  text: str
  voice: str = "en"
  rate: int = 175
  pitch: int = 50
  pitch_range: int = 50
  word_gap: int = 0


def library_paths() -> tuple[str, str]:
  """Returns (path of libespeak-ng, path of espeak-ng-data), or raises."""
  try:
    import espeakng_loader  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise EspeakUnavailableError(INSTALL_HINT) from e
  lib_path = espeakng_loader.get_library_path()
  try:
    data_path = espeakng_loader.get_data_path()
  except RuntimeError as e:
    raise EspeakUnavailableError(f"{INSTALL_HINT} ({e})") from e
  if not os.path.exists(lib_path):
    raise EspeakUnavailableError(f"{INSTALL_HINT} (missing {lib_path})")
  return lib_path, data_path


def synthesize(
    utterances: Sequence[Utterance],
    *,
    seed: int = 0,
    max_samples: int | None = None,
) -> tuple[list[np.ndarray], int]:
  """Speaks each utterance; returns (int16 waveforms, sample rate in Hz).

  The result depends only on the arguments (see the module docstring).

  Args:
    utterances: what to say, in order.
    seed: seeds eSpeak's noise generators before each utterance.
    max_samples: if given, an utterance longer than this (at eSpeak's own
      sample rate) is spoken again faster, then truncated as a last resort.
  """
  lib_path, data_path = library_paths()
  if not hasattr(os, "fork"):
    raise EspeakUnavailableError(
        "cmhn_jax synthesises speech in forked processes; this platform has no"
        " os.fork (use Linux or macOS)."
    )
  read_fd, write_fd = os.pipe()
  pid = os.fork()
  if pid == 0:  # Child: never returns.
    os.close(read_fd)
    status = 0
    try:
      _child(lib_path, data_path, utterances, seed, max_samples, write_fd)
    except BaseException as e:  # pylint: disable=broad-except
      status = 1
      try:
        message = f"{type(e).__name__}: {e}".encode("utf-8", "replace")
        _write_all(write_fd, struct.pack("<q", -1) + message)
      except BaseException:  # pylint: disable=broad-except
        pass
    finally:
      os._exit(status)  # pylint: disable=protected-access
  os.close(write_fd)
  with os.fdopen(read_fd, "rb") as f:
    payload = f.read()
  _, wait_status = os.waitpid(pid, 0)
  return _parse(payload, len(utterances), os.waitstatus_to_exitcode(wait_status))


def _write_all(fd: int, data: bytes) -> None:
  view = memoryview(data)
  while view:
    n = os.write(fd, view)
    view = view[n:]


def _parse(payload: bytes, count: int, exit_code: int):
  """Decodes the child's messages: rate, then (length, samples) per utterance."""
  pos = 0
  if len(payload) >= 8 and struct.unpack_from("<q", payload, 0)[0] == -1:
    message = payload[8:].decode("utf-8", "replace")
    if message.startswith(EspeakUnavailableError.__name__):
      raise EspeakUnavailableError(message)
    raise RuntimeError(f"eSpeak NG failed: {message}")
  if len(payload) < 8:
    raise RuntimeError(f"eSpeak NG child exited with code {exit_code} and no output.")
  (sample_rate,) = struct.unpack_from("<q", payload, pos)
  pos += 8
  waves = []
  for _ in range(count):
    (n,) = struct.unpack_from("<q", payload, pos)
    pos += 8
    waves.append(np.frombuffer(payload, np.int16, n, pos).copy())
    pos += 2 * n
  if exit_code != 0:
    raise RuntimeError(f"eSpeak NG child exited with code {exit_code}.")
  return waves, int(sample_rate)


def _child(lib_path, data_path, utterances, seed, max_samples, fd):
  """Runs in the forked child: loads the library, speaks, writes to `fd`."""
  try:
    lib = ctypes.CDLL(lib_path)
  except OSError as e:
    raise EspeakUnavailableError(f"{INSTALL_HINT} ({e})") from e
  lib.espeak_Initialize.restype = ctypes.c_int
  lib.espeak_Initialize.argtypes = [
      ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_int
  ]
  lib.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
  lib.espeak_SetParameter.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int]
  lib.espeak_ng_SetRandSeed.argtypes = [ctypes.c_long]
  lib.espeak_Synth.argtypes = [
      ctypes.c_char_p, ctypes.c_size_t, ctypes.c_uint, ctypes.c_int,
      ctypes.c_uint, ctypes.c_uint, ctypes.c_void_p, ctypes.c_void_p,
  ]
  libc = ctypes.CDLL(None)
  libc.srand.argtypes = [ctypes.c_uint]

  sample_rate = lib.espeak_Initialize(
      _AUDIO_OUTPUT_SYNCHRONOUS, 0, data_path.encode(), _ESPEAK_INITIALIZE_DONT_EXIT
  )
  if sample_rate <= 0:
    raise EspeakUnavailableError(
        f"espeak_Initialize failed ({sample_rate}) with data at {data_path}"
    )
  chunks: list[np.ndarray] = []
  callback_type = ctypes.CFUNCTYPE(
      ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.c_void_p
  )

  def on_samples(wav, n, _events):
    if wav and n > 0:
      chunks.append(np.ctypeslib.as_array(wav, shape=(n,)).copy())
    return 0

  callback = callback_type(on_samples)
  lib.espeak_SetSynthCallback(callback)

  def speak(u: Utterance, rate: int) -> np.ndarray:
    if lib.espeak_SetVoiceByName(u.voice.encode()) != 0:
      raise ValueError(f"unknown eSpeak voice {u.voice!r}")
    lib.espeak_SetParameter(_PARAM_RATE, int(rate), 0)
    lib.espeak_SetParameter(_PARAM_PITCH, int(u.pitch), 0)
    lib.espeak_SetParameter(_PARAM_RANGE, int(u.pitch_range), 0)
    lib.espeak_SetParameter(_PARAM_VOLUME, 100, 0)
    lib.espeak_SetParameter(_PARAM_WORDGAP, int(u.word_gap), 0)
    lib.espeak_ng_SetRandSeed(seed)
    libc.srand(seed & 0xFFFFFFFF)
    chunks.clear()
    text = u.text.encode("utf-8")
    err = lib.espeak_Synth(
        text, len(text) + 1, 0, _POS_CHARACTER, 0, _ESPEAK_CHARS_UTF8, None, None
    )
    if err != 0:
      raise RuntimeError(f"espeak_Synth returned {err} for {u.text!r}")
    lib.espeak_Synchronize()
    return np.concatenate(chunks) if chunks else np.zeros(0, np.int16)

  out = [struct.pack("<q", sample_rate)]
  for u in utterances:
    rate = u.rate
    wave = speak(u, rate)
    for _ in range(_MAX_RETRIES):
      if max_samples is None or len(wave) <= max_samples:
        break
      rate = min(450, int(rate * _SPEEDUP))
      wave = speak(u, rate)
    if max_samples is not None:
      wave = wave[:max_samples]
    wave = np.ascontiguousarray(wave, dtype="<i2")
    out.append(struct.pack("<q", len(wave)))
    out.append(wave.tobytes())
  _write_all(fd, b"".join(out))
