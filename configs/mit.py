r"""TIRG-LastConv with Gradient Augmentation on MIT-States (TIRG's protocol).

  python -m irtf_jax.main --config=configs/mit.py --workdir=runs/mit \
      --config.data.manual_dir=/data/mitstates
  python -m irtf_jax.main --config=configs/mit.py:smoke --workdir=/tmp/mit

`config.data.manual_dir` is left empty here: pass the folder that holds
`images/<adjective> <noun>/*.jpg` on the command line with
`--config.data.manual_dir=...` (the README says where to get it). The
first run prepares it once into `config.data.data_dir`; without a manual_dir
and without prepared data the loader stops with the download instructions.

The settings are those of the GA paper's code (Huang et al., IEEE TMM 2023)
for MIT-States: ResNet-18 + LSTM, TIRG on the last conv map, embeddings of
512, SGD with momentum 0.9, lr 1e-2 x0.1 every 50k steps, weight decay 1e-6,
batch 32, similarity matching eta 1e-3, adversarial GA eps 1e-6 with q = 1
on the query pixels, isotropic GA gamma 1e-2; 150k steps; 224 x 224 crops
(TIRG's resize and centre crop). Test recall is reported on the caption
("adj noun") and, as `test/adjective/recall@K` and `test/noun/recall@K`, on
the adjective and the noun alone. Train-split recall (Ms of WHM) uses the
loader's 10,000 sampled training queries, as TIRG's.

Option `--config.data.options.complete_text=True` gives ComposeAE's easier
texts (the whole target caption): a different protocol, not comparable.

The argument `smoke` trains a tiny model for a few steps on a small
MIT-States copy written in the published format into the workdir
(`config.data.fixture`), at 32 x 32, then evaluates once.
"""

from irtf_jax.config_base import paper_config
from irtf_jax.config_base import unknown_argument
from irtf_jax.config_base import use_smoke_settings


def get_config(arg: str = ""):
  config = paper_config("mit_states", batch_size=32, num_train_steps=150_000)
  config.data.options.image_size = 224

  if arg == "smoke":
    use_smoke_settings(config)
    config.data.options.image_size = 32
  elif arg:
    raise unknown_argument("configs/mit.py", arg)
  return config
