"""A small ordered process pool over fresh interpreters.

`multiprocessing`'s spawn and forkserver start methods re-import the caller's
`__main__` in every worker (a script without a `__main__` guard would prepare
data recursively), and fork copies a parent that may run JAX threads. These
workers are plain `python -m cmhn_jax.data._worker_main` subprocesses: nothing of the
parent is inherited. Tasks and results travel pickled over pipes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
import os
import pickle
import struct
import subprocess
import sys
from typing import Any

_OUTSTANDING = 2  # tasks queued per worker


def _send(f, obj) -> None:
  data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
  f.write(struct.pack("<Q", len(data)))
  f.write(data)
  f.flush()


def _recv(f):
  header = f.read(8)
  if len(header) < 8:
    raise EOFError
  (n,) = struct.unpack("<Q", header)
  data = f.read(n)
  if len(data) < n:
    raise EOFError
  return pickle.loads(data)


class WorkerPool:
  """`map_ordered(fn, args_list)` over `num_workers` subprocesses.

  Task i goes to worker i % num_workers; results come back in task order.
  `fn` must be importable (a module-level function).
  """

  def __init__(self, num_workers: int):
    env = dict(os.environ)
    # The parent's import path (e.g. a source checkout) reaches the workers.
    env["PYTHONPATH"] = os.pathsep.join(
        [p for p in sys.path if p] + [env.get("PYTHONPATH", "")])
    self._procs = [
        subprocess.Popen([sys.executable, "-m", "cmhn_jax.data._worker_main"],
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env)
        for _ in range(num_workers)
    ]

  def map_ordered(self, fn: Callable, tasks: Sequence[tuple]) -> Iterator[Any]:
    n = len(self._procs)
    queues = [list(range(w, len(tasks), n)) for w in range(n)]
    cursors = [0] * n
    def feed(w):
      if cursors[w] < len(queues[w]):
        _send(self._procs[w].stdin, (fn, tasks[queues[w][cursors[w]]]))
        cursors[w] += 1
    for w in range(n):
      for _ in range(_OUTSTANDING):
        feed(w)
    for i in range(len(tasks)):
      w = i % n
      try:
        ok, value = _recv(self._procs[w].stdout)
      except EOFError:
        raise RuntimeError(
            f"Worker process {w} died (exit code {self._procs[w].poll()}); "
            "see its messages above.") from None
      if not ok:
        raise RuntimeError(f"Worker process {w} failed:\n{value}")
      feed(w)
      yield value

  def close(self) -> None:
    for p in self._procs:
      try:
        p.stdin.close()
      except OSError:
        pass
    for p in self._procs:
      try:
        p.wait(timeout=30)
      except subprocess.TimeoutExpired:
        p.kill()
        p.wait()
      p.stdout.close()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()


def serve() -> None:
  """Worker loop: read (fn, args), reply (ok, result or traceback)."""
  import traceback  # pylint: disable=g-import-not-at-top
  out = os.fdopen(os.dup(1), "wb")
  os.dup2(2, 1)  # stray prints go to stderr, not into the result stream
  inp = sys.stdin.buffer
  while True:
    try:
      fn, args = _recv(inp)
    except EOFError:
      return
    try:
      reply = (True, fn(*args))
    except BaseException:  # pylint: disable=broad-except
      reply = (False, traceback.format_exc())
    _send(out, reply)

