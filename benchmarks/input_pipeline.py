"""Input pipeline throughput: examples/s of `shapes` and fake COCO, and the time
to prepare `shapes`.

    HF_HUB_OFFLINE=1 USE_TORCH=0 USE_TF=0 python benchmarks/input_pipeline.py
    python benchmarks/input_pipeline.py --builder_config=tiny --batch_size=32  # quick
    python benchmarks/input_pipeline.py --train_examples_per_s=900  # prints the ratio

Prepares into a temporary directory (so the preparation is timed from scratch)
unless --data_dir is given. Prints one line per measurement and a JSON summary.
"""

import argparse
import json
import os
import tempfile
import time

import numpy as np

from cmhn_jax import data
from cmhn_jax.data import coco
from cmhn_jax.data import espeak
from cmhn_jax.data import shapes


def espeak_seconds_per_utterance(n: int = 64) -> float:
  config = shapes.make_config("tiny")
  utterances = [shapes.sample_attributes(config, "train", i)["utterance"] for i in range(n)]
  start = time.perf_counter()
  espeak.synthesize(utterances)
  return (time.perf_counter() - start) / n


def examples_per_second(cfg, split: str, batch_size: int, batches: int,
                        warmup: int = 3) -> tuple[float, float]:
  """(examples/s once running, seconds to build the pipeline and warm up)."""
  start = time.perf_counter()
  pipe = data.get_pipeline(cfg, split, train=True, global_batch_size=batch_size)
  try:
    it = iter(pipe)
    for _ in range(warmup):  # worker start-up and first reads
      next(it)
    setup = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(batches):
      batch = next(it)
    elapsed = time.perf_counter() - start
    assert batch["valid"].all()
  finally:
    pipe.close()
  return batches * batch_size / elapsed, setup


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--builder_config", default="default")
  parser.add_argument("--data_dir", default="")
  parser.add_argument("--prepare_workers", type=int, default=min(4, os.cpu_count() or 1))
  parser.add_argument("--batch_size", type=int, default=256)
  parser.add_argument("--batches", type=int, default=30)
  parser.add_argument("--coco_images", type=int, default=200)
  parser.add_argument("--coco_batch_size", type=int, default=64)
  parser.add_argument("--workers", default="0,2")
  parser.add_argument("--train_examples_per_s", type=float, default=0.0,
                      help="the default training step's consumption, for the ratio")
  args = parser.parse_args()
  workers = [int(w) for w in args.workers.split(",")]
  results = {}
  with tempfile.TemporaryDirectory() as tmp:
    data_dir = args.data_dir or os.path.join(tmp, "data")

    results["espeak_ms_per_utterance"] = 1000 * espeak_seconds_per_utterance()
    print(f"eSpeak NG synthesis: {results['espeak_ms_per_utterance']:.1f} ms per caption")

    cfg = data.default_data_config("shapes")
    cfg.builder_config = args.builder_config
    cfg.data_dir = data_dir
    cfg.prepare_workers = args.prepare_workers
    start = time.perf_counter()
    data.prepare(cfg)
    results["shapes_prepare_s"] = time.perf_counter() - start
    config = shapes.make_config(args.builder_config)
    total = sum(config.num_examples(s) for s in shapes.SPLITS)
    print(f"prepare shapes/{args.builder_config} ({total} examples, "
          f"{args.prepare_workers} workers): {results['shapes_prepare_s']:.1f} s")

    cfg.cache = True  # what `cache=None` (auto) picks for shapes
    for w in workers:  # with the cache, the workers redraw the training images
      cfg.num_workers = w
      eps, setup = examples_per_second(cfg, "train", args.batch_size, 4 * args.batches)
      results[f"shapes_examples_per_s_cached_workers{w}"] = eps
      results[f"shapes_cache_build_s_workers{w}"] = setup
      print(f"shapes train pipeline, batch {args.batch_size}, cached in memory (the "
            f"default), {w} redraw workers: {eps:.0f} examples/s, after {setup:.1f} s to build "
            "the cache")
    cfg.cache = False
    for w in workers:
      cfg.num_workers = w
      eps, setup = examples_per_second(cfg, "train", args.batch_size, args.batches)
      results[f"shapes_examples_per_s_workers{w}"] = eps
      print(f"shapes train pipeline, batch {args.batch_size}, not cached, {w} "
            f"workers: {eps:.0f} examples/s (start-up {setup:.1f} s)")

    raw = coco.write_fake_coco(os.path.join(tmp, "coco"), num_train=args.coco_images,
                               num_restval=0, num_val=5, num_test=5,
                               image_size=(640, 480))
    ccfg = data.default_data_config("coco_raw")
    ccfg.raw_dir = raw
    ccfg.data_dir = os.path.join(tmp, "coco_prepared")
    data.prepare(ccfg)
    for w in workers:
      ccfg.num_workers = w
      eps, _ = examples_per_second(ccfg, "train", args.coco_batch_size,
                                   max(5, args.batches // 3))
      results[f"coco_examples_per_s_workers{w}"] = eps
      print(f"fake COCO (640x480 JPEG -> 224 crops) train pipeline, batch "
            f"{args.coco_batch_size}, {w} workers: {eps:.0f} examples/s")

  if args.train_examples_per_s:
    best = max(v for k, v in results.items() if k.startswith("shapes_examples_per_s"))
    results["shapes_over_training"] = best / args.train_examples_per_s
    print(f"shapes pipeline / training consumption: {results['shapes_over_training']:.1f}x "
          "(target >= 3x)")
  print(json.dumps({k: round(v, 2) for k, v in results.items()}))


if __name__ == "__main__":
  np.set_printoptions(precision=3)
  main()
