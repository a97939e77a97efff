r"""Feature-level TIRG on the built-in css_synth dataset (no download).

  python -m irtf_jax.main --config=configs/css_synth.py --workdir=runs/css_synth
  python -m irtf_jax.main --config=configs/css_synth.py:smoke --workdir=/tmp/x
  python scripts/ga_experiment.py   # runs configs/css_synth.py:ga

The default trains TIRG on the pooled feature of a ResNet-10 (PyTorch's
initializations, as TIRG's code) for 600 SGD steps of 32 at a constant
learning rate (TIRG never decays it on CSS), then ranks every test query
against the 9,100 test images and as many training queries against the first
training families with as many images (train-split recall on a gallery of
the same size and structure). Fresh, it runs in about 11 minutes on 2 CPU
cores, and its test R@1 is well above the image-only baseline (README,
Results). The argument `smoke` is a tiny dataset and a handful of steps
through the full code path; `ga` is one run of the Gradient Augmentation
experiment: the same model and loss, 200 steps with an evaluation every 50
(the learning curves), 32 x 32 images and 40 test families (3,640 images),
so that its 31 runs fit in about an hour on 2 cores (two at a time).
"""

from irtf_jax.config_base import base_config
from irtf_jax.config_base import unknown_argument
from irtf_jax.config_base import use_smoke_settings


def get_config(arg: str = ""):
  config = base_config()
  config.data.name = "css_synth"
  config.model.name = "tirg"
  config.model.image_encoder.depth = 10
  config.batch_size = 32
  config.num_train_steps = 600
  config.optimizer.lr_decay_factor = 1.0  # constant, as TIRG on CSS
  config.log_every = 10
  config.eval_every = 600
  config.checkpoint_every = 200
  config.eval.max_test_queries = 0  # all 2,793
  config.eval.train_gallery = "test_size"
  if arg == "smoke":
    use_smoke_settings(config)
    config.data.fixture = False  # css_synth is generated, not read
    # 20 families of 1 + 4 * 2 scenes per split: 180 images each.
    config.data.options.num_train_scenes = 20
    config.data.options.num_test_scenes = 20
    config.data.options.mods_per_scene = 4
    config.data.options.tree_depth = 2
  elif arg == "ga":
    config.num_train_steps = 200
    config.eval_every = 50
    config.checkpoint_every = 50
    config.data.options.num_test_scenes = 40
    config.data.options.image_size = 32
  elif arg:
    raise unknown_argument("configs/css_synth.py", arg, ("", "smoke", "ga"))
  return config
