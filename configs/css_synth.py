r"""TIRG-LastConv on the built-in css_synth dataset (no download).

  python -m irtf_jax.main --config=configs/css_synth.py --workdir=runs/css_synth
  python -m irtf_jax.main --config=configs/css_synth.py:smoke --workdir=/tmp/x
  python scripts/ga_experiment.py   # runs configs/css_synth.py:ga

The default is sized to train on a 2-core CPU in minutes; the argument
`smoke` is a tiny dataset and a handful of steps through the full code path;
`ga` is the Gradient Augmentation experiment's run: the same model, loss and
data, a third of the default's training examples (100 steps of 16), every test
query against the test split's images and 1,000 train queries against the
train split's.
"""

from irtf_jax.config_base import base_config, unknown_argument, use_smoke_settings


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
    # 20 families of 1 + 4 * 2 scenes per split: 180 images each.
    config.data.options.num_train_scenes = 20
    config.data.options.num_test_scenes = 20
    config.data.options.mods_per_scene = 4
    config.data.options.tree_depth = 2
  elif arg == "ga":
    config.batch_size = 16
    config.num_train_steps = 100
    config.optimizer.lr_decay_steps = 80
    config.eval_every = 100
    config.checkpoint_every = 100
    config.eval.max_test_queries = 0  # all 2,793 of the default data
    config.eval.max_train_queries = 1000
  elif arg:
    raise unknown_argument("configs/css_synth.py", arg, ("", "smoke", "ga"))
  return config
