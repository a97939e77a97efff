r"""Trains and evaluates a composed image retrieval model.

  python -m irtf_jax.main --config=configs/css_synth.py --workdir=runs/css_synth
  python -m irtf_jax.main --config=configs/css_synth.py:smoke --workdir=/tmp/x
  python -m irtf_jax.main --config=configs/mit.py --workdir=runs/mit \
      --config.data.manual_dir=/data/mitstates
  python -m irtf_jax.main --config=... --workdir=... --mode=evaluate

Running the same command again in the same workdir resumes from the latest
checkpoint. Any config field can be overridden with --config.a.b=value.
"""

import logging as pylogging
import os

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, "
                               "metrics and pictures.", required=True)
_MODE = flags.DEFINE_enum("mode", "train", ["train", "evaluate"],
                          "train (and evaluate), or evaluate the latest "
                          "checkpoint.")
_MULTIHOST = flags.DEFINE_bool(
    "multihost", False, "Call jax.distributed.initialize() first (GPU clusters "
    "with SLURM/MPI, TPU pods: the coordinator is auto-detected).")
config_flags.DEFINE_config_file("config", None, "Config file (with an "
                                "optional ':arg', e.g. ':smoke').",
                                lock_config=True)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError("Too many command-line arguments.")
  import jax  # pylint: disable=g-import-not-at-top
  # Orbax logs every save at INFO with a long record; keep the console for
  # the progress bar and results.
  pylogging.getLogger("absl").setLevel(pylogging.WARNING)
  logging.set_verbosity(logging.WARNING)
  # Reruns (resuming, evaluating, sweeping seeds) reuse compiled programs.
  jax.config.update("jax_compilation_cache_dir", os.environ.get(
      "IRTF_JAX_COMPILATION_CACHE",
      os.path.join(os.path.expanduser("~"), ".cache", "irtf_jax", "xla")))
  if _MULTIHOST.value:
    jax.distributed.initialize()
  from irtf_jax import train  # pylint: disable=g-import-not-at-top
  logging.info("JAX processes: %d, devices: %s", jax.process_count(),
               jax.devices())
  config = flags.FLAGS.config
  if _MODE.value == "train":
    train.train_and_evaluate(config, _WORKDIR.value)
  else:
    train.evaluate_checkpoint(config, _WORKDIR.value)


if __name__ == "__main__":
  flags.mark_flags_as_required(["config"])
  app.run(main)
