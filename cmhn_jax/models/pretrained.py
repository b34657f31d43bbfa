"""Pretrained Hugging Face Flax encoders, loaded from a local directory, as NNX modules.

Each wrapper has the `__call__` of the from-scratch encoder of its modality and an
`out_dim` attribute:

  kind           class                 __call__ arguments                       output
  'clip_vision'  CLIPVisionEncoder     images (B, H, W, 3) float32              CLIP embedding
  'clip_text'    CLIPTextEncoder       tokens (B, L) int32, mask (B, L) bool    CLIP embedding
  'bert'         BertTextEncoder       tokens (B, L) int32, mask (B, L) bool    mean token state
  'wav2vec2'     Wav2Vec2AudioEncoder  waveform (B, S) float, mask (B, S) bool  mean frame state

  enc = load_pretrained_encoder('bert', '/models/all-MiniLM-L6-v2', trainable=False)
  enc = build_encoder('clip_vision', path='/models/clip-vit-base-patch32', trainable=True)

The directory is what `save_pretrained` writes: `config.json` plus Flax weights
(`flax_model.msgpack`) or safetensors weights (`model.safetensors`, Flax or PyTorch
layout; reading them needs neither torch nor TensorFlow). Nothing is fetched from the
hub. Tokens are ids from the model's own tokenizer (read from the same directory).

What each returns:
- CLIP: the tower's pooled output (vision: the post-LayerNorm CLS state; text: the
  final-LayerNorm state of the EOS token) times the CLIP projection when the directory
  holds a full `CLIPModel` (`out_dim = projection_dim`, the same as
  `get_image_features` / `get_text_features`); a bare `CLIPVisionModel` /
  `CLIPTextModel` directory gives the pooled output (`out_dim = hidden_size`). Images
  come normalised by the input pipeline (set its image mean/std to CLIP's) and are
  resized to the tower's `image_size` when they differ (`resize=False` makes that an
  error). With `normalize=True` they come in [0, 1] instead and the encoder applies the
  `image_mean`/`image_std` of `preprocessor_config.json` (OpenAI CLIP's when absent).
- BERT family (BERT, MiniLM, RoBERTa, ... through `FlaxAutoModel`): the mean of the
  last hidden states over the unmasked tokens, as sentence-transformers pools (without
  its final L2 normalisation). The pooler layer is not loaded.
- Wav2Vec2: the mean of the last hidden states over the frames whose receptive field
  lies inside the mask. The conv feature extractor shortens the sequence; the frame mask
  comes from the number of valid samples through the model's output-length formula for
  its VALID convs (`num_frames`; a test pins it to Hugging Face's own). Samples
  outside the mask are zeroed first, so their values never matter. Waveforms are 16 kHz
  mono, as the input pipeline gives them (in [-1, 1]); they are normalised to zero mean
  and unit variance over the valid samples when `normalize` is True (the default, None,
  follows `do_normalize` of `preprocessor_config.json`, on when absent).
  Hugging Face's Flax Wav2Vec2 supports only `do_stable_layer_norm=True` checkpoints
  (wav2vec2-large-lv60 and the like).

Frozen or fine-tuned (`trainable`): the Hugging Face parameters live inside the module
as NNX variables in the model's own nested layout (`nnx.split` / `nnx.state` show them).
When `trainable=True` they are `nnx.Param`s and train like any other parameter. When
`trainable=False` they are `FrozenParam`s, a Variable type that is not `nnx.Param`, so
`nnx.Optimizer(model, tx, wrt=nnx.Param)` and `nnx.grad` (which differentiates
`nnx.Param`s) leave them alone, and the forward pass wraps them in
`jax.lax.stop_gradient`, so even differentiating every variable gives zero for them.
Dropout is off in both cases (the models are called with `train=False`).

`dtype` is the compute dtype handed to the Hugging Face model; parameters stay float32
and outputs are float32.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import os
from typing import Any

import jax
import safetensors
import jax.numpy as jnp
import numpy as np
import transformers
from flax import nnx
from flax.core import unfreeze
from transformers.utils import constants as hf_constants

from cmhn_jax.models.encoders import masked_mean

Dtype = Any

_WEIGHT_FILES = ('flax_model.msgpack', 'flax_model.msgpack.index.json', 'model.safetensors')


class FrozenParam(nnx.Variable):
  """A pretrained weight held fixed: not an `nnx.Param`, so optimizers skip it."""


def _is_variable(x) -> bool:
  return isinstance(x, nnx.Variable)


def _check_dir(path: str, kind: str) -> None:
  """Raises FileNotFoundError, saying what belongs there, unless `path` holds a checkpoint."""
  what = (f'a Hugging Face {kind!r} checkpoint directory: config.json plus '
          f'{" or ".join(_WEIGHT_FILES[::2])}, as written by '
          '`model.save_pretrained(path)` of the Flax model (or by the PyTorch model with '
          'safetensors)')
  if not os.path.isdir(path):
    raise FileNotFoundError(f'no directory {path!r}; expected {what}')
  present = sorted(os.listdir(path))
  if 'config.json' not in present or not any(f in present for f in _WEIGHT_FILES):
    hint = ''
    if 'pytorch_model.bin' in present:
      hint = ('; it holds only pytorch_model.bin, which cannot be read without torch: '
              'convert it to model.safetensors')
    raise FileNotFoundError(f'{path!r} holds {present}{hint}; expected {what}')


def _read_json(path: str, name: str) -> dict[str, Any]:
  file = os.path.join(path, name)
  if not os.path.isfile(file):
    return {}
  with open(file, encoding='utf-8') as f:
    return json.load(f)


def _select(params: dict[str, Any], shapes: dict[str, Any], where: str = '') -> dict[str, Any]:
  """The part of `params` that `shapes` (a model's params_shape_tree) asks for."""
  out = {}
  for key, shape in shapes.items():
    if key not in params:
      raise ValueError(f'checkpoint lacks parameter {where}/{key}')
    if isinstance(shape, dict):
      out[key] = _select(params[key], shape, f'{where}/{key}')
    else:
      if tuple(params[key].shape) != tuple(shape.shape):
        raise ValueError(f'checkpoint parameter {where}/{key} has shape {params[key].shape}, '
                         f'the model expects {shape.shape}')
      out[key] = params[key]
  return out


def _load(model_cls: type, path: str, dtype: Dtype):
  """Loads a checkpoint; returns (params, config, the concrete model class)."""
  # PyTorch-layout safetensors are converted against randomly initialised parameters;
  # Flax checkpoints load directly, without the cost of an init.
  model = model_cls.from_pretrained(path, dtype=dtype, local_files_only=True,
                                    _do_init=_is_pytorch_safetensors(path))
  if isinstance(model, tuple):  # _do_init=False returns (model, params)
    model, params = model
  else:
    params = model.params
  return unfreeze(params), model.config, type(model)


def _is_pytorch_safetensors(path: str) -> bool:
  """Whether Hugging Face will read `path` from a PyTorch-layout model.safetensors."""
  if any(os.path.isfile(os.path.join(path, f)) for f in _WEIGHT_FILES[:2]):
    return False  # Flax weights take precedence
  with safetensors.safe_open(os.path.join(path, 'model.safetensors'), framework='numpy') as f:
    return (f.metadata() or {}).get('format') == 'pt'


def _function(model_cls: type, config, dtype: Dtype, params: dict[str, Any], **module_kwargs):
  """A parameter-free `model_cls` (the function) and the matching part of `params`."""
  fn = model_cls(config, dtype=dtype, _do_init=False, **module_kwargs)
  return fn, _select(params, unfreeze(fn.params_shape_tree))


class PretrainedEncoder(nnx.Module):
  """Holds a Hugging Face Flax model's function and its parameters as NNX variables."""

  def __init__(self, hf_model, params: dict[str, Any], *, trainable: bool, out_dim: int,
               projection: jax.Array | None = None):
    variable = nnx.Param if trainable else FrozenParam
    self.hf_model = hf_model  # static: built with _do_init=False, holds no weights
    self.trainable = trainable
    self.out_dim = out_dim
    # Through numpy: Hugging Face may leave the arrays committed to the CPU.
    to_device = lambda x: variable(jnp.asarray(np.asarray(x)))
    self.params = nnx.data(jax.tree.map(to_device, params))
    self.projection = None if projection is None else to_device(projection)

  def hf_params(self) -> dict[str, Any]:
    """The parameters as the Hugging Face model takes them (gradient-stopped if frozen)."""
    params = jax.tree.map(lambda v: v[...], self.params, is_leaf=_is_variable)
    return params if self.trainable else jax.lax.stop_gradient(params)

  def _project(self, pooled: jax.Array) -> jax.Array:
    if self.projection is not None:
      kernel = self.projection[...]
      if not self.trainable:
        kernel = jax.lax.stop_gradient(kernel)
      pooled = pooled @ kernel.astype(pooled.dtype)
    return pooled.astype(jnp.float32)


def _model_type(path: str, kind: str, accepted: tuple[str, ...]) -> str:
  _check_dir(path, kind)
  model_type = _read_json(path, 'config.json').get('model_type')
  if model_type not in accepted:
    raise ValueError(f'{path!r} holds a {model_type!r} model; the {kind!r} encoder reads '
                     f'{" or ".join(map(repr, accepted))}')
  return model_type


def _clip_tower(path: str, tower: str, dtype: Dtype, project: bool):
  """(function, params, projection kernel or None, pooled width) of one CLIP tower."""
  model_type = _model_type(path, f'clip_{tower}', ('clip', f'clip_{tower}_model'))
  tower_cls = {'vision': transformers.FlaxCLIPVisionModel,
               'text': transformers.FlaxCLIPTextModel}[tower]
  if model_type == 'clip':
    params, config, _ = _load(transformers.FlaxCLIPModel, path, dtype)
    tower_config = config.vision_config if tower == 'vision' else config.text_config
    fn, tower_params = _function(tower_cls, tower_config, dtype, params)
    proj_name = 'visual_projection' if tower == 'vision' else 'text_projection'
    projection = params[proj_name]['kernel'] if project else None
    width = config.projection_dim if project else tower_config.hidden_size
    return fn, tower_params, projection, width
  params, config, _ = _load(tower_cls, path, dtype)
  fn, tower_params = _function(tower_cls, config, dtype, params)
  return fn, tower_params, None, config.hidden_size


class CLIPVisionEncoder(PretrainedEncoder):
  """CLIP image tower: images (B, H, W, 3) float32 -> (B, out_dim).

  Images are normalised as CLIP expects, or in [0, 1] with `normalize=True`.
  """

  def __init__(self, path: str, *, trainable: bool, dtype: Dtype = jnp.float32,
               project: bool = True, resize: bool = True, normalize: bool = False):
    fn, params, projection, width = _clip_tower(path, 'vision', dtype, project)
    super().__init__(fn, params, trainable=trainable, out_dim=width, projection=projection)
    self.image_size = fn.config.image_size
    self.resize = resize
    self.normalize = normalize
    processor = _read_json(path, 'preprocessor_config.json')
    self.mean = tuple(processor.get('image_mean', hf_constants.OPENAI_CLIP_MEAN))
    self.std = tuple(processor.get('image_std', hf_constants.OPENAI_CLIP_STD))

  def __call__(self, images: jax.Array) -> jax.Array:
    x = images.astype(jnp.float32)
    size = (self.image_size, self.image_size)
    if x.shape[1:3] != size:
      if not self.resize:
        raise ValueError(f'this CLIP tower takes {size[0]}x{size[1]} images, got '
                         f'{x.shape[1]}x{x.shape[2]} (resize=False)')
      x = jax.image.resize(x, (x.shape[0], *size, x.shape[3]), 'bilinear')
    if self.normalize:
      x = (x - jnp.asarray(self.mean)) / jnp.asarray(self.std)
    pixel_values = jnp.transpose(x, (0, 3, 1, 2))  # Hugging Face's CLIP takes NCHW
    out = self.hf_model(pixel_values, params=self.hf_params(), train=False)
    return self._project(out.pooler_output)


class CLIPTextEncoder(PretrainedEncoder):
  """CLIP text tower: tokens (B, L) int32 with mask (B, L) bool -> (B, out_dim).

  Masked tokens are replaced by id 0 before the call, so they cannot be taken for the
  EOS token the tower pools at.
  """

  def __init__(self, path: str, *, trainable: bool, dtype: Dtype = jnp.float32,
               project: bool = True):
    fn, params, projection, width = _clip_tower(path, 'text', dtype, project)
    super().__init__(fn, params, trainable=trainable, out_dim=width, projection=projection)

  def __call__(self, tokens: jax.Array, mask: jax.Array) -> jax.Array:
    mask = mask.astype(bool)
    tokens = jnp.where(mask, tokens, 0)
    out = self.hf_model(tokens, attention_mask=mask.astype(jnp.int32), params=self.hf_params(),
                        train=False)
    return self._project(out.pooler_output)


# Flax text encoders called as model(input_ids, attention_mask=...).
_BERT_FAMILY = ('bert', 'roberta', 'xlm-roberta', 'distilbert', 'electra', 'albert')


class BertTextEncoder(PretrainedEncoder):
  """BERT-family text model: tokens (B, L) int32, mask (B, L) bool -> mean token state."""

  def __init__(self, path: str, *, trainable: bool, dtype: Dtype = jnp.float32):
    _model_type(path, 'bert', _BERT_FAMILY)
    params, config, model_cls = _load(transformers.FlaxAutoModel, path, dtype)
    fields = {f.name for f in dataclasses.fields(model_cls.module_class)}
    no_pooler = {'add_pooling_layer': False} if 'add_pooling_layer' in fields else {}
    fn, params = _function(model_cls, config, dtype, params, **no_pooler)
    super().__init__(fn, params, trainable=trainable, out_dim=config.hidden_size)

  def __call__(self, tokens: jax.Array, mask: jax.Array) -> jax.Array:
    mask = mask.astype(bool)
    tokens = jnp.where(mask, tokens, 0)
    out = self.hf_model(tokens, attention_mask=mask.astype(jnp.int32), params=self.hf_params(),
                        train=False)
    return masked_mean(out.last_hidden_state, mask)


class Wav2Vec2AudioEncoder(PretrainedEncoder):
  """Wav2Vec2: waveform (B, S) float with mask (B, S) bool -> mean frame state."""

  def __init__(self, path: str, *, trainable: bool, dtype: Dtype = jnp.float32,
               normalize: bool | None = None):
    _model_type(path, 'wav2vec2', ('wav2vec2',))
    config = transformers.Wav2Vec2Config.from_pretrained(path)
    if not config.do_stable_layer_norm:
      raise NotImplementedError(
          f"{path!r}: Hugging Face's Flax Wav2Vec2 runs only do_stable_layer_norm=True "
          'checkpoints (e.g. wav2vec2-large-lv60), not wav2vec2-base')
    if config.add_adapter:
      raise NotImplementedError(f'{path!r}: Wav2Vec2 with an adapter is not supported')
    params, config, _ = _load(transformers.FlaxWav2Vec2Model, path, dtype)
    fn, params = _function(transformers.FlaxWav2Vec2Model, config, dtype, params)
    super().__init__(fn, params, trainable=trainable, out_dim=config.hidden_size)
    self.kernels = tuple(config.conv_kernel)
    self.strides = tuple(config.conv_stride)
    processor = _read_json(path, 'preprocessor_config.json')
    self.normalize = bool(processor.get('do_normalize', True) if normalize is None else normalize)

  def num_frames(self, num_samples: jax.Array) -> jax.Array:
    """Frames the conv feature extractor makes of `num_samples` samples (VALID convs)."""
    for k, s in zip(self.kernels, self.strides):
      num_samples = (num_samples - k) // s + 1
    return jnp.maximum(num_samples, 0)

  def __call__(self, waveform: jax.Array, mask: jax.Array) -> jax.Array:
    mask = mask.astype(bool)
    x = jnp.where(mask, waveform.astype(jnp.float32), 0.0)
    count = jnp.maximum(mask.sum(axis=1, keepdims=True), 1)
    if self.normalize:  # as Wav2Vec2FeatureExtractor's zero_mean_unit_var_norm
      mean = x.sum(axis=1, keepdims=True) / count
      var = jnp.where(mask, (x - mean) ** 2, 0.0).sum(axis=1, keepdims=True) / count
      x = jnp.where(mask, (x - mean) / jnp.sqrt(var + 1e-7), 0.0)
    out = self.hf_model(x, attention_mask=mask.astype(jnp.int32), params=self.hf_params(),
                        train=False)
    hidden = out.last_hidden_state
    frames = self.num_frames(mask.sum(axis=1))
    frame_mask = jnp.arange(hidden.shape[1])[None, :] < frames[:, None]
    return masked_mean(hidden, frame_mask)


PRETRAINED: dict[str, type[PretrainedEncoder]] = {
    'clip_vision': CLIPVisionEncoder,
    'clip_text': CLIPTextEncoder,
    'bert': BertTextEncoder,
    'wav2vec2': Wav2Vec2AudioEncoder,
}


def load_pretrained_encoder(kind: str, path: str, *, trainable: bool, dtype: Dtype = jnp.float32,
                            **options) -> PretrainedEncoder:
  """Loads the `kind` encoder from the checkpoint directory `path` (see the module doc).

  `options` are the wrapper's own switches (`project`, `resize`, `normalize`: see each
  class); an unknown one raises TypeError naming it.
  """
  try:
    cls = PRETRAINED[kind]
  except KeyError:
    raise ValueError(
        f'unknown pretrained encoder kind {kind!r}; known: {sorted(PRETRAINED)}') from None
  accepted = set(inspect.signature(cls.__init__).parameters) - {
      'self', 'path', 'trainable', 'dtype'}
  unknown = sorted(set(options) - accepted)
  if unknown:
    raise TypeError(f'pretrained encoder {kind!r} got unknown option(s) {unknown}; '
                    f'it accepts {sorted(accepted)}')
  return cls(path, trainable=trainable, dtype=dtype, **options)
