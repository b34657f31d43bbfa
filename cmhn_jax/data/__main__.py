"""Prepares a dataset on disk: `python -m cmhn_jax.data --name=shapes`.

    python -m cmhn_jax.data --name=shapes --builder_config=default
    python -m cmhn_jax.data --name=coco_raw --raw_dir=/data/coco
    python -m cmhn_jax.data --name=manifest --manifest_path=my_data.jsonl

Any key of `default_data_config` can be given as --key=value.
"""

import argparse
import ast
import time

from cmhn_jax import data


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--name", default="shapes", choices=data.DATASETS)
  args, rest = parser.parse_known_args(argv)
  cfg = data.default_data_config(args.name)
  for item in rest:
    if not item.startswith("--") or "=" not in item:
      parser.error(f"expected --key=value, got {item!r}")
    key, value = item[2:].split("=", 1)
    if key not in cfg:
      parser.error(f"unknown key {key!r}; keys: {sorted(cfg)}")
    current = cfg[key]
    if isinstance(current, str):
      cfg[key] = value
    else:
      try:
        cfg[key] = ast.literal_eval(value)
      except (ValueError, SyntaxError):
        cfg[key] = value
  start = time.time()
  data.prepare(cfg)
  print(f"{args.name} ready in {cfg.data_dir} ({time.time() - start:.1f} s)")


if __name__ == "__main__":
  main()
