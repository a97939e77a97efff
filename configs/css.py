r"""TIRG-LastConv with Gradient Augmentation on the published CSS (css3d).

  python -m irtf_jax.main --config=configs/css.py --workdir=runs/css \
      --config.data.manual_dir=/data/CSSDataset
  python -m irtf_jax.main --config=configs/css.py:smoke --workdir=/tmp/css

`config.data.manual_dir` is left empty here: pass the folder that holds
`css_toy_dataset_novel2_small.dup.npy` and `images/` on the command line with
`--config.data.manual_dir=...` (the README says where to get it). The
first run prepares it once into `config.data.data_dir`; without a manual_dir
and without prepared data the loader stops with the download instructions.

The settings are those of the GA paper's code (Huang et al., IEEE TMM 2023)
for CSS: ResNet-18 + LSTM, TIRG on the last conv map, embeddings of 512, SGD
with momentum 0.9, lr 1e-2 x0.1 every 50k steps, weight decay 1e-6, batch
200, similarity matching eta 1e-3, adversarial GA eps 1e-6 with q = 1 on the
query pixels, isotropic GA gamma 1e-2; 160k steps as TIRG trains CSS. Images
keep their native size. Train-split recall (Ms of WHM) uses 10,000 training
queries, as TIRG's.

The argument `smoke` trains a tiny model for a few steps on a small CSS copy
written in the published format into the workdir (`config.data.fixture`),
then evaluates once: the full code path in about a minute on a CPU.
"""

from irtf_jax.config_base import paper_config
from irtf_jax.config_base import unknown_argument
from irtf_jax.config_base import use_smoke_settings


def get_config(arg: str = ""):
  config = paper_config("css3d", batch_size=200, num_train_steps=160_000)
  config.eval.max_train_queries = 10_000  # TIRG's train-split sample

  if arg == "smoke":
    use_smoke_settings(config)
  elif arg:
    raise unknown_argument("configs/css.py", arg)
  return config
