r"""Command line: train and/or evaluate a CMHN.

  python -m cmhn_jax.main --config=configs/shapes.py --workdir=/tmp/cmhn
  python -m cmhn_jax.main --config=configs/coco.py:runlocal --workdir=/tmp/coco --mode=train
  python -m cmhn_jax.main ... --config.num_steps=100 --config.loss.energy=0.0

Several hosts: pass --coordinator_address, --num_processes and --process_id (or set them
in the environment a cluster launcher provides) to join with `jax.distributed`.
"""

from absl import app
from absl import flags
from absl import logging
import jax
from ml_collections import config_flags

from cmhn_jax import train

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py[:variant]).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and the report.")
_MODE = flags.DEFINE_enum("mode", "train_and_eval", ["train", "eval", "train_and_eval"], "What to run.")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (multi-host).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes (multi-host).")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index (multi-host).")

flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  if not flags.FLAGS["verbosity"].present:  # Orbax logs every save at INFO: quiet by default
    logging.set_verbosity(logging.WARNING)
  if _COORDINATOR.value or _NUM_PROCESSES.value:
    # Unset values are discovered from the cluster (SLURM, TPU pods, ...).
    jax.distributed.initialize(coordinator_address=_COORDINATOR.value,
                               num_processes=_NUM_PROCESSES.value, process_id=_PROCESS_ID.value)
  logging.info("JAX process %d/%d, %d local / %d global devices", jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count())
  train.train_and_evaluate(_CONFIG.value, _WORKDIR.value, mode=_MODE.value)


if __name__ == "__main__":
  app.run(main)
