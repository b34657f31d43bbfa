"""Speed and memory of `cmhn_jax.retrieval.retrieve` against this machine's ceilings.

  python benchmarks/retrieval.py                      # the full grid (slow: N = 1e6 included)
  python benchmarks/retrieval.py --n=10000,100000 --b=64,1024 --t=1

For each N (one subprocess per N, so each peak-memory figure is its own), M x d = 3 x 256,
B in {1, 64, 1024} and T in {1, 3} it prints seconds per call, queries/s and GFLOP/s
(4 B N M d per step) of

  * `cmhn T`:      T softmax steps, streamed over chunks, state only (`final_pass=False`):
                   T score GEMMs + T read-out GEMMs;
  * `cmhn T+top10`: the same plus the final scoring pass with a streamed top-10;
  * `gemm 2T`:     the ceiling: the two plain `jnp` GEMMs of one step, timed in the same
                   process, times T;
  * `faiss top10`: `faiss.IndexFlatIP` top-10 search of the same queries, when faiss-cpu is
                   installed (`pip install -e .[benchmark]`).

and the ratios the issue targets: cmhn T / gemm 2T (target <= 1.3 at B = 1024), cmhn / faiss
(target <= 2.2), and the peak resident memory above the patterns at the largest B (target:
under 1 GB, i.e. no B x N matrix).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np

M, D = 3, 256


def _status_gb(field: str) -> float:
  with open("/proc/self/status") as f:
    for line in f:
      if line.startswith(field + ":"):
        return int(line.split()[1]) / 2**20
  return float("nan")


def _reset_peak() -> None:
  """Resets the kernel's peak-RSS mark (VmHWM), so the next peak is the next call's own."""
  with open("/proc/self/clear_refs", "w") as f:
    f.write("5")


def _time(fn, *args, repeats: int) -> float:
  out = fn(*args)  # compile and warm up
  jax_block(out)
  best = float("inf")
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax_block(fn(*args))
    best = min(best, time.perf_counter() - t0)
  return best


def jax_block(x):
  import jax
  return jax.block_until_ready(x)


def run_one_n(n: int, bs: list[int], ts: list[int], chunk: int, repeats: int) -> list[dict]:
  import jax
  import jax.numpy as jnp
  from cmhn_jax import retrieval

  key = jax.random.PRNGKey(0)
  patterns = jax.random.normal(key, (n, M, D), jnp.float32)
  patterns = patterns / jnp.linalg.norm(patterns, axis=-1, keepdims=True)
  jax_block(patterns)
  rows = []
  try:
    import faiss  # pylint: disable=import-outside-toplevel
  except ImportError:
    faiss = None
  index = None
  for b in bs:
    cue = patterns[:b] + 0.1 * jax.random.normal(jax.random.PRNGKey(1), (b, M, D))
    mask = jnp.zeros((b, M), bool).at[:, 0].set(True)
    row = dict(N=n, B=b)
    jax_block(cue)
    base = _status_gb("VmRSS")  # the patterns and the cue are resident already
    _reset_peak()
    for t in ts:
      state_only = jax.jit(lambda c, p, t=t: retrieval.retrieve(
          c, p, cue_mask=mask, beta=10.0, method="fixed_point", max_steps=t, tol=0.0,
          chunk_size=min(chunk, n), final_pass=False).state)
      with_top = jax.jit(lambda c, p, t=t: retrieval.retrieve(
          c, p, cue_mask=mask, beta=10.0, method="fixed_point", max_steps=t, tol=0.0,
          chunk_size=min(chunk, n), top_k=10).top_indices)
      row[f"cmhn{t}"] = _time(state_only, cue, patterns, repeats=repeats)
      row[f"cmhn{t}+top10"] = _time(with_top, cue, patterns, repeats=repeats)
    row["peak_above_patterns_gb"] = _status_gb("VmHWM") - base
    # The ceiling: the two plain GEMMs of one step (scores, then read-out).
    flat = patterns.reshape(n, M * D)
    q = cue.reshape(b, M * D)
    gemm_scores = jax.jit(lambda q_, p_: q_ @ p_.T)
    gemm_readout = jax.jit(lambda a_, p_: a_ @ p_)
    s = gemm_scores(q, flat)
    row["gemm2"] = _time(gemm_scores, q, flat, repeats=repeats) + _time(gemm_readout, s, flat, repeats=repeats)
    del s
    if faiss is not None:
      if index is None:
        index = faiss.IndexFlatIP(M * D)
        index.add(np.asarray(flat))
      qn = np.asarray(q)
      row["faiss"] = _time(lambda: index.search(qn, 10), repeats=repeats)
    rows.append(row)
    print(json.dumps(row), file=sys.stderr, flush=True)
  return rows


def _numpy_gflops() -> float:
  a = np.random.rand(2048, 2048).astype(np.float32)
  a @ a
  t0 = time.perf_counter()
  for _ in range(5):
    a @ a
  return 5 * 2 * 2048**3 / (time.perf_counter() - t0) / 1e9


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--n", default="10000,100000,1000000")
  ap.add_argument("--b", default="1,64,1024")
  ap.add_argument("--t", default="1,3")
  ap.add_argument("--chunk", type=int, default=8192)  # 1024 x 8192 score blocks stay cache-friendly
  ap.add_argument("--repeats", type=int, default=2)
  ap.add_argument("--single", action="store_true", help=argparse.SUPPRESS)
  args = ap.parse_args()
  ns, bs, ts = ([int(float(v)) for v in s.split(",")] for s in (args.n, args.b, args.t))
  if args.single:
    print(json.dumps(run_one_n(ns[0], bs, ts, args.chunk, args.repeats)))
    return
  print(f"machine: {os.cpu_count()} CPUs; numpy float32 GEMM 2048^3: {_numpy_gflops():.1f} GFLOP/s")
  rows = []
  for n in ns:
    out = subprocess.run([sys.executable, __file__, "--single", f"--n={n}", f"--b={args.b}",
                          f"--t={args.t}", f"--chunk={args.chunk}", f"--repeats={args.repeats}"],
                         check=True, stdout=subprocess.PIPE, text=True)
    rows += json.loads(out.stdout.strip().splitlines()[-1])
  header = (f"{'N':>8} {'B':>5} {'T':>2} {'s/call':>9} {'q/s':>9} {'GFLOP/s':>8} {'gemm2T s':>9} "
            f"{'x gemm':>7} {'+top10 s':>9} {'faiss s':>8} {'x faiss':>8} {'peak+GB':>8}")
  print(header)
  for r in rows:
    for t in ts:
      sec, ceil = r[f"cmhn{t}"], t * r["gemm2"]
      flops = 4 * r["B"] * r["N"] * M * D * t
      faiss_s = r.get("faiss", float("nan"))
      print(f"{r['N']:>8} {r['B']:>5} {t:>2} {sec:>9.4f} {r['B'] / sec:>9.1f} {flops / sec / 1e9:>8.1f} "
            f"{ceil:>9.4f} {sec / ceil:>7.2f} {r[f'cmhn{t}+top10']:>9.4f} {faiss_s:>8.4f} "
            f"{sec / faiss_s:>8.2f} {r['peak_above_patterns_gb']:>8.2f}")
  print(f"patterns: {M} x {D} float32 per item ({M * D * 4 * max(ns) / 2**30:.2f} GiB at N={max(ns)}).")
  print("x gemm = cmhn T steps / (T x the two plain GEMMs of a step); x faiss = cmhn / FAISS "
        "IndexFlatIP top-10; peak+GB = peak RSS of the cmhn calls above what was resident before "
        "them (the patterns included).")


if __name__ == "__main__":
  main()
