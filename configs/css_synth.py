r"""TIRG-LastConv on the built-in css_synth dataset (no download).

  python -m irtf_jax.main --config=configs/css_synth.py --workdir=runs/css_synth
  python -m irtf_jax.main --config=configs/css_synth.py:smoke --workdir=/tmp/x

The default is sized to train on a 2-core CPU in minutes; the argument
`smoke` is a tiny dataset and a handful of steps through the full code path.
"""

from irtf_jax.config_base import base_config, use_smoke_settings


def get_config(arg: str = ""):
  config = base_config()
  config.data.name = "css_synth"
  config.model.name = "tirg_lastconv"
  config.batch_size = 32
  config.num_train_steps = 300
  config.optimizer.lr_decay_steps = 250
  config.log_every = 10
  config.eval_every = 300
  config.checkpoint_every = 100
  config.eval.max_test_queries = 4000
  config.eval.max_train_queries = 2000
  if arg == "smoke":
    use_smoke_settings(config)
    config.data.fixture = False  # css_synth is generated, not read
    config.data.options.num_train_scenes = 200
    config.data.options.num_test_scenes = 100
  elif arg:
    raise ValueError(f"configs/css_synth.py: unknown argument {arg!r}; "
                     "allowed: '' or 'smoke'")
  return config
