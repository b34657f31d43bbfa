"""Small stand-ins for real data and models, for `runlocal` configs, notebooks and tests.

A `runlocal` config names one of `PREPARE` in `config.prepare`; `train_and_evaluate` calls it
before anything reads data or weights. Each writes only what is missing, into the paths the
config names, so it never touches a user's own files.

* `fake_coco_tiny_clip`: a COCO-layout tree (`cmhn_jax.data.coco.write_fake_coco`: JPEGs,
  caption JSON, a Karpathy split) at `config.data.raw_dir`, and a tiny random Hugging Face
  Flax CLIP (with a CLIP BPE tokenizer) at the path of the image/text encoders.
"""

from __future__ import annotations

import json
import os
import string

from cmhn_jax.data import coco


def write_tiny_clip(path: str, *, image_size: int = 32, projection_dim: int = 32,
                    max_len: int = 32, seed: int = 0) -> str:
  """A tiny random `FlaxCLIPModel` and its tokenizer in `path` (what `save_pretrained` writes).

  The tokenizer is a real `CLIPTokenizer` over a character-level BPE vocabulary (no merges), so
  the pipeline's Hugging Face tokenizer path and the CLIP text tower's EOS pooling are exercised
  exactly as with a downloaded checkpoint.
  """
  if os.path.exists(os.path.join(path, "config.json")):
    return path
  import jax  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  os.makedirs(path, exist_ok=True)
  chars = sorted(set(string.ascii_lowercase + string.digits + string.punctuation))
  vocab = {}
  for c in chars:
    vocab[c] = len(vocab)
    vocab[c + "</w>"] = len(vocab)
  for special in ("<|startoftext|>", "<|endoftext|>"):
    vocab[special] = len(vocab)
  with open(os.path.join(path, "vocab.json"), "w") as f:
    json.dump(vocab, f)
  with open(os.path.join(path, "merges.txt"), "w") as f:
    f.write("#version: 0.2\n")
  tok = transformers.CLIPTokenizer(os.path.join(path, "vocab.json"), os.path.join(path, "merges.txt"),
                                   pad_token="<|endoftext|>", model_max_length=max_len)
  tok.save_pretrained(path)
  cfg = transformers.CLIPConfig(
      text_config=dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=64,
                       num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=max_len,
                       bos_token_id=vocab["<|startoftext|>"], eos_token_id=vocab["<|endoftext|>"],
                       pad_token_id=vocab["<|endoftext|>"]),
      vision_config=dict(image_size=image_size, patch_size=8, hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4),
      projection_dim=projection_dim)
  model = transformers.FlaxCLIPModel(cfg, _do_init=False)
  init = jax.jit(model.init_weights, static_argnums=1)  # eager init costs ~10x
  params = init(jax.random.PRNGKey(seed), ((1, max_len), (1, image_size, image_size, 3)))
  model.save_pretrained(path, params=params)
  return path


def fake_coco_tiny_clip(config) -> None:
  raw_dir = config.data.raw_dir
  if not os.path.exists(os.path.join(raw_dir, "annotations")):
    coco.write_fake_coco(raw_dir, num_train=24, num_restval=8, num_val=8, num_test=8,
                         image_size=(48, 40))
  paths = {config.model.encoders[m].path for m in config.model.modalities
           if "path" in config.model.encoders[m]}
  for p in paths:
    write_tiny_clip(p, image_size=int(config.data.image_size), max_len=int(config.data.text_max_len))


PREPARE = {"fake_coco_tiny_clip": fake_coco_tiny_clip}


def prepare(config) -> None:
  """Runs `config.prepare` (a `PREPARE` name), if the config names one."""
  name = config.get("prepare") or ""
  if not name:
    return
  if name not in PREPARE:
    raise ValueError(f"config.prepare={name!r} is unknown; known: {sorted(PREPARE)}.")
  PREPARE[name](config)
