r"""Trains and evaluates a composed image retrieval model.

  python -m irtf_jax.main --config=configs/css_synth.py --workdir=runs/css_synth
  python -m irtf_jax.main --config=configs/css_synth.py:smoke --workdir=/tmp/x
  python -m irtf_jax.main --config=configs/mit.py --workdir=runs/mit \
      --config.data.manual_dir=/data/mitstates
  python -m irtf_jax.main --config=... --workdir=... --mode=evaluate

Running the same command again in the same workdir resumes from the latest
checkpoint. Any config field can be overridden with --config.a.b=value.

On Linux with glibc the command restarts itself once, at once, with
GLIBC_TUNABLES=glibc.malloc.hugetlb=1 (`irtf_jax.host_memory`: XLA:CPU's
per-step buffers on huge pages; IRTF_JAX_SYSTEM_MALLOC=1 turns this off).

Exit codes: 0 done; 75 stopped by SIGTERM or SIGINT after saving a
checkpoint (run the same command to continue); 2 a bad config value; 1 any
other error the message explains (a busy workdir, damaged checkpoints, a full
disk, a non-finite loss, missing data).
"""

import logging as pylogging
import os
import re
import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from irtf_jax import host_memory

# JAX and the trainer (flax, optax, orbax, grain: about a second to import)
# are imported where they are used, so that the restart under
# `host_memory.reexecute_with_huge_pages` comes before them rather than
# after, and they are imported once per command, not twice.

_WORKDIR = flags.DEFINE_string(
    "workdir",
    None,
    "Directory for checkpoints, metrics and pictures.",
    required=True,
)
_MODE = flags.DEFINE_enum(
    "mode",
    "train",
    ["train", "evaluate"],
    "train (and evaluate), or evaluate the latest checkpoint.",
)
_MULTIHOST = flags.DEFINE_bool(
    "multihost",
    False,
    "Call jax.distributed.initialize() first (GPU clusters "
    "with SLURM/MPI, TPU pods: the coordinator is auto-detected).",
)
config_flags.DEFINE_config_file(
    "config",
    None,
    "Config file (with an optional ':arg', e.g. ':smoke').",
    lock_config=True,
)


def _explained_errors() -> tuple[type[Exception], ...]:
  """Errors whose message says all a user needs: printed without a
  traceback."""
  from irtf_jax import checkpointing  # pylint: disable=g-import-not-at-top
  from irtf_jax import train  # pylint: disable=g-import-not-at-top

  return (
      checkpointing.WorkdirBusyError,
      checkpointing.CheckpointError,
      checkpointing.DiskFullError,
      train.NonFiniteLossError,
      FileNotFoundError,
  )


def _one_line(error: Exception, argv: list[str]) -> str:
  """A flag-parsing error as one line naming the flag at fault."""
  text = str(error)
  if isinstance(error, (AttributeError, KeyError)):
    # ml_collections: an override of a field the config does not have.
    found = re.search(r"([A-Za-z0-9_]+)", text)
    name = found.group(1) if found else text
    culprits = [
        a.split("=")[0] for a in argv if a.split("=")[0].endswith(f".{name}")
    ] or [repr(name)]
    suggestion = re.search(r'Did you mean "([A-Za-z0-9_]+)"', text)
    hint = (
        f"did you mean {suggestion.group(1)}?"
        if suggestion
        else "the config file lists the fields it has"
    )
    return f"{', '.join(culprits)}: no such config field; {hint}"
  return " ".join(text.split())


def parse_flags(argv: list[str], flag_values=flags.FLAGS) -> list[str]:
  """Parses the command line; any error is one line on stderr and exit 2."""
  try:
    return flag_values(argv)
  except (flags.Error, AttributeError, KeyError, TypeError, ValueError) as e:
    print(f"error: {_one_line(e, argv)}", file=sys.stderr)
    sys.exit(2)


def parse_config(argv: list[str]):
  """The config the command line `argv` gives, parsed as `main` parses it
  (for tests and tools: its own flag registry, so it can run many times)."""
  flag_values = flags.FlagValues()
  config_flags.DEFINE_config_file(
      "config", None, flag_values=flag_values, lock_config=True, sys_argv=argv
  )
  parse_flags(argv, flag_values)
  return flag_values.config


def run(config, workdir: str, mode: str) -> None:
  from irtf_jax import train  # pylint: disable=g-import-not-at-top

  if mode == "train":
    train.train_and_evaluate(config, workdir)
  else:
    train.evaluate_checkpoint(config, workdir)


def main(argv):
  import jax  # pylint: disable=g-import-not-at-top

  from irtf_jax import checkpointing  # pylint: disable=g-import-not-at-top
  from irtf_jax import config_base  # pylint: disable=g-import-not-at-top

  if len(argv) > 1:
    raise app.UsageError("Too many command-line arguments.")
  # Orbax logs every save at INFO with a long record; keep the console for
  # the progress bar and results.
  pylogging.getLogger("absl").setLevel(pylogging.WARNING)
  logging.set_verbosity(logging.WARNING)
  # Reruns (resuming, evaluating, sweeping seeds) reuse compiled programs.
  jax.config.update(
      "jax_compilation_cache_dir",
      os.environ.get(
          "IRTF_JAX_COMPILATION_CACHE",
          os.path.join(os.path.expanduser("~"), ".cache", "irtf_jax", "xla"),
      ),
  )
  if _MULTIHOST.value:
    jax.distributed.initialize()
  logging.info(
      "JAX processes: %d, devices: %s", jax.process_count(), jax.devices()
  )
  try:
    run(flags.FLAGS.config, _WORKDIR.value, _MODE.value)
  except config_base.ConfigError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  except checkpointing.Preempted as e:
    print(e, file=sys.stderr)
    sys.exit(checkpointing.PREEMPTED_EXIT_CODE)
  except _explained_errors() as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)


if __name__ == "__main__":
  # Huge pages for XLA:CPU's per-step temporaries (host_memory): glibc reads
  # the setting only at start-up, so this may restart the command once.
  host_memory.reexecute_with_huge_pages("irtf_jax.main")
  flags.mark_flags_as_required(["config"])
  app.run(main, flags_parser=parse_flags)
