r"""CMHN with pretrained CLIP ViT-B/32 on COCO captions (image <-> text).

Needs, on local disk (nothing is downloaded):
  * the Hugging Face Flax/safetensors CLIP checkpoint `openai/clip-vit-base-patch32` in
    $CMHN_MODELS/clip-vit-base-patch32 (or --config.clip_path=...), its tokenizer beside it;
  * COCO: either raw files (annotations/captions_{train,val}2014.json, train2014/, val2014/ and
    Karpathy's dataset_coco.json) in $CMHN_DATA_DIR/downloads/coco (or --config.data.raw_dir=...),
    or a TFDS-prepared `coco_captions` directory (--config.data.name=coco).

  python -m cmhn_jax.main --config=configs/coco.py --workdir=/tmp/cmhn_coco

`runlocal` runs in seconds on a fake COCO tree and a tiny random CLIP that it writes itself:

  python -m cmhn_jax.main --config=configs/coco.py:runlocal --workdir=/tmp/cmhn_coco_local

Retrieval is evaluated on the Karpathy 5k test split, relevance by image (5 captions each).
"""

import os
import tempfile

import ml_collections

from cmhn_jax import data


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  variant = arg or "default"
  if variant not in ("default", "runlocal", "contrastive"):
    raise ValueError(f"Unknown variant {variant!r} of configs/coco.py; "
                     "expected default, runlocal or contrastive.")
  runlocal = variant == "runlocal"
  c = ml_collections.ConfigDict()
  c.seed = 0
  models = os.environ.get("CMHN_MODELS", os.path.expanduser("~/models"))
  scratch = os.path.join(tempfile.gettempdir(), "cmhn_runlocal_coco")
  c.clip_path = os.path.join(scratch, "tiny_clip") if runlocal else os.path.join(models, "clip-vit-base-patch32")
  c.prepare = "fake_coco_tiny_clip" if runlocal else ""

  c.data = data.default_data_config("coco_raw")
  c.data.raw_dir = os.path.join(scratch, "coco") if runlocal else os.path.join(data.default_data_dir(), "downloads", "coco")
  if runlocal:
    c.data.data_dir = os.path.join(scratch, "prepared")
    c.data.image_size = 32
    c.data.text_max_len = 16
  c.data.tokenizer = c.get_ref("clip_path")

  c.model = ml_collections.ConfigDict()
  c.model.embed_dim = 64 if runlocal else 512
  c.model.modalities = ("image", "text")
  c.model.dtype = "float32"
  c.model.head = "linear"
  c.model.logit_scale = 1 / 0.07
  c.model.encoders = ml_collections.ConfigDict({
      "image": {"name": "clip_vision", "path": c.get_ref("clip_path"), "trainable": False},
      "text": {"name": "clip_text", "path": c.get_ref("clip_path"), "trainable": True},
  })
  c.model.memory = ml_collections.ConfigDict(dict(
      num_patterns=16 if runlocal else 4096, similarity="cosine", normalizer="softmax",
      beta=20.0, learn_beta=True, lam=1.0, coupling=(1.0, 1.0), learn_coupling=False,
      learn_cross=False, init="kmeans", kmeans_batches=2 if runlocal else 64))

  c.loss = ml_collections.ConfigDict({"infonce": 1.0, "infoloob": 0.0, "energy": 0.1,
                                      "assignment": 0.0, "completion": 1.0})
  # group_positives: same-group pairs in a batch are positives, not negatives (the group is
  # the concept for `shapes`, the image for COCO's five captions).
  c.loss_options = ml_collections.ConfigDict({"cloob_beta": 14.3, "group_positives": True})
  if variant == "contrastive":
    c.loss.energy = c.loss.completion = 0.0

  c.batch_size = 8 if runlocal else 256
  c.num_steps = 4 if runlocal else 20000
  c.grad_accum_steps = 1
  c.optimizer = ml_collections.ConfigDict(dict(
      lr=1e-3 if runlocal else 1e-5, end_lr_factor=0.0, warmup_steps=1 if runlocal else 1000,
      b1=0.9, b2=0.98, eps=1e-8, weight_decay=0.1, clip_norm=1.0))
  c.log_every = 2 if runlocal else 100
  c.checkpoint = ml_collections.ConfigDict(dict(every=2 if runlocal else 1000, keep=3, async_save=True))
  c.mesh = ml_collections.ConfigDict({"data": -1, "memory": 1})
  c.partition_rules = ((r"params/patterns$", ("memory", None, None)),
                       (r"opt/.*/patterns$", ("memory", None, None)),
                       (r".*", ()))
  c.evaluators = ml_collections.ConfigDict({
      "retrieval": dict(split="test", relevance="group", ks=(1, 5, 10),
                        batch_size=8 if runlocal else 512, cmhn_method="fixed_point",
                        cmhn_steps=3, unique_per_group=("image",)),
  })
  return c
