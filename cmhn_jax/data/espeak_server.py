"""eSpeak NG synthesis server: run as a script, it forks one child per request.

This file is executed by path (`python espeak_server.py`), not as part of the
package, so the server process imports nothing but the standard library and
numpy: no JAX, no threads. Forking it is therefore safe, and every child starts
from the same clean state (see espeak.py for why that matters). The child loads
libespeak-ng, speaks the request's utterances in order and hands the samples to
the server, which passes them on.

Protocol on stdin/stdout, each message a uint64 length then the bytes:
  request:  JSON {lib_path, data_path, seed, max_samples, utterances:
            [[text, voice, rate, pitch, pitch_range, word_gap], ...]}
  response: int64 sample rate, then per utterance int64 n and n int16 samples;
            or int64 -1 and a UTF-8 error message.
"""

import ctypes
import json
import os
import struct
import sys

import numpy as np

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

# An utterance longer than max_samples is spoken again this much faster, at
# most _MAX_RETRIES times, then truncated.
_SPEEDUP = 1.25
_MAX_RETRIES = 3


def write_all(fd: int, data: bytes) -> None:
  view = memoryview(data)
  while view:
    n = os.write(fd, view)
    view = view[n:]


def read_message(f) -> bytes | None:
  header = f.read(8)
  if len(header) < 8:
    return None
  (n,) = struct.unpack("<Q", header)
  data = f.read(n)
  if len(data) < n:
    return None
  return data


def error_payload(message: str) -> bytes:
  return struct.pack("<q", -1) + message.encode("utf-8", "replace")


def speak_all(request: dict) -> bytes:
  """Runs in a fresh child: loads the library and speaks every utterance."""
  lib = ctypes.CDLL(request["lib_path"])
  lib.espeak_Initialize.restype = ctypes.c_int
  lib.espeak_Initialize.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
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
      _AUDIO_OUTPUT_SYNCHRONOUS, 0, request["data_path"].encode(),
      _ESPEAK_INITIALIZE_DONT_EXIT)
  if sample_rate <= 0:
    raise RuntimeError(f"espeak_Initialize failed ({sample_rate}) with data at "
                       f"{request['data_path']}")
  chunks = []
  callback_type = ctypes.CFUNCTYPE(
      ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.c_void_p)

  def on_samples(wav, n, _events):
    if wav and n > 0:
      chunks.append(np.ctypeslib.as_array(wav, shape=(n,)).copy())
    return 0

  callback = callback_type(on_samples)
  lib.espeak_SetSynthCallback(callback)
  seed = int(request["seed"])

  def speak(text, voice, rate, pitch, pitch_range, word_gap):
    if lib.espeak_SetVoiceByName(voice.encode()) != 0:
      raise ValueError(f"unknown eSpeak voice {voice!r}")
    for param, value in ((_PARAM_RATE, rate), (_PARAM_PITCH, pitch),
                         (_PARAM_RANGE, pitch_range), (_PARAM_VOLUME, 100),
                         (_PARAM_WORDGAP, word_gap)):
      lib.espeak_SetParameter(param, int(value), 0)
    lib.espeak_ng_SetRandSeed(seed)
    libc.srand(seed & 0xFFFFFFFF)
    chunks.clear()
    data = text.encode("utf-8")
    err = lib.espeak_Synth(data, len(data) + 1, 0, _POS_CHARACTER, 0,
                           _ESPEAK_CHARS_UTF8, None, None)
    if err != 0:
      raise RuntimeError(f"espeak_Synth returned {err} for {text!r}")
    lib.espeak_Synchronize()
    return np.concatenate(chunks) if chunks else np.zeros(0, np.int16)

  max_samples = request["max_samples"]
  out = [struct.pack("<q", sample_rate)]
  for text, voice, rate, pitch, pitch_range, word_gap in request["utterances"]:
    wave = speak(text, voice, rate, pitch, pitch_range, word_gap)
    for _ in range(_MAX_RETRIES):
      if max_samples is None or len(wave) <= max_samples:
        break
      rate = min(450, int(rate * _SPEEDUP))
      wave = speak(text, voice, rate, pitch, pitch_range, word_gap)
    if max_samples is not None:
      wave = wave[:max_samples]
    wave = np.ascontiguousarray(wave, dtype="<i2")
    out.append(struct.pack("<q", len(wave)))
    out.append(wave.tobytes())
  return b"".join(out)


def handle(request: dict) -> bytes:
  """Forks a child to serve `request`; returns its payload."""
  read_fd, write_fd = os.pipe()
  pid = os.fork()
  if pid == 0:  # child: never returns
    os.close(read_fd)
    status = 0
    try:
      payload = speak_all(request)
    except BaseException as e:  # pylint: disable=broad-except
      status, payload = 1, error_payload(f"{type(e).__name__}: {e}")
    try:
      write_all(write_fd, payload)
    finally:
      os._exit(status)  # pylint: disable=protected-access
  os.close(write_fd)
  with os.fdopen(read_fd, "rb") as f:
    payload = f.read()
  _, status = os.waitpid(pid, 0)
  if not payload:
    payload = error_payload(f"synthesis child exited with {os.waitstatus_to_exitcode(status)}")
  return payload


def main() -> None:
  out = os.fdopen(os.dup(1), "wb")
  os.dup2(2, 1)  # stray prints go to stderr
  inp = sys.stdin.buffer
  while True:
    message = read_message(inp)
    if message is None:
      return
    payload = handle(json.loads(message))
    out.write(struct.pack("<Q", len(payload)))
    out.write(payload)
    out.flush()


if __name__ == "__main__":
  main()
