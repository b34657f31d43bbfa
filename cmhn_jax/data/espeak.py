"""Speech synthesis with eSpeak NG through the `espeakng-loader` wheel (ctypes).

The wheel ships `libespeak-ng.so` and its voice data, so no system package is
needed. We talk to the C API (`speak_lib.h`) in synchronous mode.

Determinism. eSpeak NG keeps static state between utterances inside the library
(the same call made twice in one process gives different samples, even with
`espeak_ng_SetRandSeed` before each call), but a *fresh* copy of the library
replaying the same sequence of calls produces the same bytes. So every call to
`synthesize` is served by a freshly forked process that loads the library and
speaks the given utterances in order: the result depends only on the
arguments, never on what was spoken before or in which process.

The forking happens in a small server process (`espeak_server.py`, started once
per calling process and run as a plain script, so it holds no JAX threads);
neither the caller nor the server ever loads the library itself.
"""

from __future__ import annotations

from collections.abc import Sequence
import dataclasses
import json
import os
import struct
import subprocess
import sys
import threading

import numpy as np

INSTALL_HINT = (
    "eSpeak NG is not available: install the `espeakng-loader` wheel "
    "(`pip install espeakng-loader`), which bundles libespeak-ng and its voice "
    "data; no system package is needed."
)
SAMPLE_RATE = 22050  # eSpeak NG's output rate
_SERVER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "espeak_server.py")


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


class _Server:
  """The per-process synthesis server (a subprocess), started on first use."""

  _lock = threading.Lock()
  _proc: subprocess.Popen | None = None
  _pid: int | None = None

  @classmethod
  def request(cls, message: bytes) -> bytes:
    with cls._lock:
      if cls._proc is None or cls._pid != os.getpid() or cls._proc.poll() is not None:
        if not hasattr(os, "fork"):
          raise EspeakUnavailableError(
              "cmhn_jax synthesises speech in forked processes; this platform "
              "has no os.fork (use Linux or macOS).")
        cls._proc = subprocess.Popen([sys.executable, _SERVER], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE)
        cls._pid = os.getpid()
      proc = cls._proc
      try:
        proc.stdin.write(struct.pack("<Q", len(message)) + message)
        proc.stdin.flush()
        header = proc.stdout.read(8)
        (n,) = struct.unpack("<Q", header)
        payload = proc.stdout.read(n)
        if len(payload) < n:
          raise EOFError
      except (OSError, EOFError, struct.error) as e:
        cls._proc = None
        raise RuntimeError(
            f"The eSpeak NG server process died (exit code {proc.poll()}).") from e
      return payload


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
  request = json.dumps({
      "lib_path": lib_path, "data_path": data_path, "seed": int(seed),
      "max_samples": None if max_samples is None else int(max_samples),
      "utterances": [[u.text, u.voice, int(u.rate), int(u.pitch),
                      int(u.pitch_range), int(u.word_gap)] for u in utterances],
  }).encode("utf-8")
  return _parse(_Server.request(request), len(utterances))


def _parse(payload: bytes, count: int) -> tuple[list[np.ndarray], int]:
  """Decodes a response: rate, then (length, samples) per utterance."""
  (sample_rate,) = struct.unpack_from("<q", payload, 0)
  if sample_rate == -1:
    message = payload[8:].decode("utf-8", "replace")
    if message.startswith("OSError"):
      raise EspeakUnavailableError(f"{INSTALL_HINT} ({message})")
    raise RuntimeError(f"eSpeak NG failed: {message}")
  pos = 8
  waves = []
  for _ in range(count):
    (n,) = struct.unpack_from("<q", payload, pos)
    pos += 8
    waves.append(np.frombuffer(payload, np.int16, n, pos).copy())
    pos += 2 * n
  return waves, int(sample_rate)
