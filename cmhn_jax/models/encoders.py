"""Encoders trained from scratch, and the registry that builds every encoder by name.

One encoder per modality maps a batch to one vector per example:

  ImageEncoder   images (B, H, W, 3) float32           -> (B, out_dim)
  TextEncoder    tokens (B, L) int32, mask (B, L) bool  -> (B, out_dim)
  AudioEncoder   log-mel (B, T, F) float, mask (B, T)   -> (B, out_dim)

Positions where the mask is False never influence the output: attention never
attends to them, pooling skips them, and the audio convolutions see zeros there
(and keep their own padding fixed, so padding a clip gives the same vector as
cutting it). Tests check this by changing the padded values.

`dtype` is the compute dtype (e.g. `jnp.bfloat16`); parameters are always float32
and outputs are float32, so losses downstream need not care.

Every encoder, the pretrained Hugging Face ones included, is built by name:

  enc = build_encoder('image_cnn', out_dim=128, widths=(32, 64, 128), rngs=nnx.Rngs(0))
  enc = build_encoder('clip_vision', path='/models/clip', trainable=False)

An unknown name raises ValueError (listing the known ones); an unknown keyword raises
TypeError naming it.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

Dtype = Any


def masked_mean(x: jax.Array, mask: jax.Array) -> jax.Array:
  """Mean of `x` (B, T, D) over the positions where `mask` (B, T) is True, in float32.

  Masked positions are selected away (not multiplied by 0), so even a NaN there cannot
  leak; a row with no valid position gives zeros.
  """
  mask = mask.astype(bool)
  total = jnp.where(mask[..., None], x.astype(jnp.float32), 0.0).sum(axis=1)
  count = mask.sum(axis=1, dtype=jnp.float32)[:, None]
  return total / jnp.maximum(count, 1.0)


def sinusoidal_positions(length: int, dim: int) -> jax.Array:
  """Fixed sin/cos position codes (length, dim), as in Vaswani et al. (2017)."""
  pos = jnp.arange(length, dtype=jnp.float32)[:, None]
  freq = jnp.exp(-math.log(10000.0) * jnp.arange(0, dim, 2, dtype=jnp.float32) / dim)
  codes = jnp.zeros((length, dim), jnp.float32)
  codes = codes.at[:, 0::2].set(jnp.sin(pos * freq))
  return codes.at[:, 1::2].set(jnp.cos(pos * freq[: dim // 2]))


class TransformerBlock(nnx.Module):
  """Pre-LayerNorm transformer block: x + MHA(LN(x)), then x + MLP(LN(x))."""

  def __init__(self, width: int, *, num_heads: int, mlp_ratio: float, dtype: Dtype, rngs: nnx.Rngs):
    if width % num_heads:
      raise ValueError(f'width {width} is not divisible by num_heads {num_heads}')
    hidden = int(width * mlp_ratio)
    self.ln_attn = nnx.LayerNorm(width, dtype=dtype, rngs=rngs)
    self.attn = nnx.MultiHeadAttention(
        num_heads, width, dtype=dtype, decode=False, deterministic=True, rngs=rngs)
    self.ln_mlp = nnx.LayerNorm(width, dtype=dtype, rngs=rngs)
    self.mlp_in = nnx.Linear(width, hidden, dtype=dtype, rngs=rngs)
    self.mlp_out = nnx.Linear(hidden, width, dtype=dtype, rngs=rngs)

  def __call__(self, x: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    """x (B, L, width); mask (B, L) bool marks the keys that may be attended to."""
    attn_mask = None if mask is None else mask[:, None, None, :]
    x = x + self.attn(self.ln_attn(x), mask=attn_mask)
    return x + self.mlp_out(nnx.gelu(self.mlp_in(self.ln_mlp(x))))


class _Transformer(nnx.Module):
  """A stack of `TransformerBlock`s followed by a final LayerNorm."""

  def __init__(self, width, *, depth, num_heads, mlp_ratio, dtype, rngs):
    self.blocks = nnx.List([
        TransformerBlock(width, num_heads=num_heads, mlp_ratio=mlp_ratio, dtype=dtype, rngs=rngs)
        for _ in range(depth)
    ])
    self.ln_out = nnx.LayerNorm(width, dtype=dtype, rngs=rngs)

  def __call__(self, x, mask=None):
    for block in self.blocks:
      x = block(x, mask)
    return self.ln_out(x)


def _check_pool(pool: str, allowed: tuple[str, ...] = ('mean', 'cls')) -> str:
  if pool not in allowed:
    raise ValueError(f'pool must be one of {allowed}, got {pool!r}')
  return pool


class ImageEncoder(nnx.Module):
  """Images (B, H, W, 3) -> (B, out_dim): a small strided CNN or a tiny ViT.

  kind='cnn' (arguments `widths`, `stem_patch`, `stage_depth`, `norm`, `num_groups`, `pool`): a
  patchify stem (a `stem_patch` x `stem_patch` conv with the same stride) to `widths[0]`
  channels, then one 3x3 stride-2 conv per further width (64x64 input with the defaults:
  16x16 -> 8x8 -> 4x4), each stage followed by `stage_depth` residual 3x3 convs at its
  resolution; every conv is followed by the norm ('group' GroupNorm or 'layer' LayerNorm
  over channels) and gelu. Then global pooling ('mean', or 'max', which keeps a small object's
  features from being averaged away by the background), LayerNorm and a Linear to `out_dim`.
  The patchify stem keeps the CPU cost low: no conv runs at the input resolution (one that
  did made the whole encoder 2-3x slower on CPU).

  kind='vit' (arguments `patch_size`, `width`, `depth`, `num_heads`, `mlp_ratio`,
  `image_size`, `pool`): non-overlapping patches embedded by a strided conv, learned
  positions for `image_size` x `image_size` input, pre-LN transformer blocks, mean or
  CLS pooling, Linear to `out_dim`.

  Arguments of the other kind are refused (TypeError) rather than silently ignored.
  """

  _CNN_DEFAULTS = dict(widths=(32, 64, 128), stem_patch=4, stage_depth=0, norm='group',
                      num_groups=8, pool='mean')
  _VIT_DEFAULTS = dict(patch_size=8, width=128, depth=2, num_heads=4, mlp_ratio=2.0,
                       image_size=64, pool='mean')

  def __init__(
      self,
      *,
      out_dim: int,
      kind: str = 'cnn',
      channels: int = 3,
      # kind='cnn'
      widths: Sequence[int] | None = None,
      stem_patch: int | None = None,
      stage_depth: int | None = None,
      norm: str | None = None,
      num_groups: int | None = None,
      # kind='vit'
      patch_size: int | None = None,
      width: int | None = None,
      depth: int | None = None,
      num_heads: int | None = None,
      mlp_ratio: float | None = None,
      image_size: int | None = None,
      pool: str | None = None,
      dtype: Dtype = jnp.float32,
      rngs: nnx.Rngs,
  ):
    given = dict(widths=widths, stem_patch=stem_patch, stage_depth=stage_depth, norm=norm,
                 num_groups=num_groups, patch_size=patch_size, width=width, depth=depth,
                 num_heads=num_heads, mlp_ratio=mlp_ratio, image_size=image_size, pool=pool)
    if kind == 'cnn':
      defaults = self._CNN_DEFAULTS
    elif kind == 'vit':
      defaults = self._VIT_DEFAULTS
    else:
      raise ValueError(f"ImageEncoder kind must be 'cnn' or 'vit', got {kind!r}")
    foreign = sorted(k for k, v in given.items() if v is not None and k not in defaults)
    if foreign:
      raise TypeError(f'ImageEncoder(kind={kind!r}) does not take {foreign}; '
                      f'its own arguments are {sorted(defaults)}')
    args = {k: (given[k] if given[k] is not None else v) for k, v in defaults.items()}

    self.kind = kind
    self.out_dim = out_dim
    self.dtype = dtype
    if kind == 'cnn':
      self._init_cnn(channels, rngs=rngs, **args)
    else:
      self._init_vit(channels, rngs=rngs, **args)
    self.head = nnx.Linear(self.features, out_dim, dtype=dtype, rngs=rngs)

  def _norm(self, features, norm, num_groups, rngs):
    if norm == 'group':
      return nnx.GroupNorm(features, num_groups=min(num_groups, features), dtype=self.dtype,
                           rngs=rngs)
    if norm == 'layer':
      return nnx.LayerNorm(features, dtype=self.dtype, rngs=rngs)
    raise ValueError(f"norm must be 'group' or 'layer', got {norm!r}")

  def _init_cnn(self, channels, *, widths, stem_patch, stage_depth, norm, num_groups, pool,
                rngs):
    if not widths:
      raise ValueError('widths must name at least one stage')
    self.pool = _check_pool(pool, ('mean', 'max'))
    down, down_norms, res, res_norms = [], [], [], []
    cin = channels
    for i, w in enumerate(widths):
      if i == 0:  # patchify stem: non-overlapping stem_patch x stem_patch patches
        conv = nnx.Conv(cin, w, (stem_patch, stem_patch), strides=stem_patch, padding='VALID',
                        dtype=self.dtype, rngs=rngs)
      else:
        conv = nnx.Conv(cin, w, (3, 3), strides=2, dtype=self.dtype, rngs=rngs)
      down.append(conv)
      down_norms.append(self._norm(w, norm, num_groups, rngs))
      res.append(nnx.List([nnx.Conv(w, w, (3, 3), dtype=self.dtype, rngs=rngs)
                           for _ in range(stage_depth)]))
      res_norms.append(nnx.List([self._norm(w, norm, num_groups, rngs)
                                 for _ in range(stage_depth)]))
      cin = w
    self.down, self.down_norms = nnx.List(down), nnx.List(down_norms)
    self.res, self.res_norms = nnx.List(res), nnx.List(res_norms)
    self.ln_out = nnx.LayerNorm(cin, dtype=self.dtype, rngs=rngs)
    self.features = cin

  def _init_vit(self, channels, *, patch_size, width, depth, num_heads, mlp_ratio, image_size,
                pool, rngs):
    if image_size % patch_size:
      raise ValueError(f'image_size {image_size} is not a multiple of patch_size {patch_size}')
    self.image_size = image_size
    self.pool = _check_pool(pool)
    self.patch = nnx.Conv(channels, width, (patch_size, patch_size), strides=patch_size,
                          padding='VALID', dtype=self.dtype, rngs=rngs)
    n = (image_size // patch_size) ** 2
    self.pos = nnx.Param(0.02 * jax.random.normal(rngs.params(), (n, width)))
    # Not zero: LayerNorm maps a zero token to zero, whose query cannot learn.
    self.cls = (nnx.Param(0.02 * jax.random.normal(rngs.params(), (width,)))
                if pool == 'cls' else None)
    self.transformer = _Transformer(width, depth=depth, num_heads=num_heads, mlp_ratio=mlp_ratio,
                                    dtype=self.dtype, rngs=rngs)
    self.features = width

  def __call__(self, images: jax.Array) -> jax.Array:
    x = images.astype(self.dtype)
    if self.kind == 'cnn':
      for conv, norm, res, res_norms in zip(self.down, self.down_norms, self.res, self.res_norms):
        x = nnx.gelu(norm(conv(x)))
        for rconv, rnorm in zip(res, res_norms):
          x = x + nnx.gelu(rnorm(rconv(x)))
      x = self.ln_out(x.max(axis=(1, 2)) if self.pool == 'max' else x.mean(axis=(1, 2)))
    else:
      if images.shape[1:3] != (self.image_size, self.image_size):
        raise ValueError(f'this ViT was built for {self.image_size}x{self.image_size} images, '
                         f'got {images.shape[1]}x{images.shape[2]}')
      x = self.patch(x)
      x = x.reshape(x.shape[0], -1, x.shape[-1]) + self.pos[...].astype(self.dtype)
      if self.cls is not None:
        cls = jnp.broadcast_to(self.cls[...].astype(self.dtype), (x.shape[0], 1, x.shape[-1]))
        x = jnp.concatenate([cls, x], axis=1)
      x = self.transformer(x)
      x = x[:, 0] if self.cls is not None else x.mean(axis=1)
    return self.head(x).astype(jnp.float32)


class TextEncoder(nnx.Module):
  """Tokens (B, L) int32 with mask (B, L) bool -> (B, out_dim).

  Token embedding + learned positions (up to `max_len`), `depth` pre-LN transformer
  blocks that never attend to masked tokens, then masked mean pooling (or a learned CLS
  token prepended to the sequence, `pool='cls'`), Linear to `out_dim`.
  """

  def __init__(
      self,
      *,
      out_dim: int,
      vocab_size: int,
      max_len: int = 64,
      width: int = 128,
      depth: int = 2,
      num_heads: int = 4,
      mlp_ratio: float = 2.0,
      pool: str = 'mean',
      dtype: Dtype = jnp.float32,
      rngs: nnx.Rngs,
  ):
    self.out_dim = out_dim
    self.max_len = max_len
    self.pool = _check_pool(pool)
    self.dtype = dtype
    self.embed = nnx.Embed(vocab_size, width, dtype=dtype, rngs=rngs)
    self.pos = nnx.Param(0.02 * jax.random.normal(rngs.params(), (max_len, width)))
    # Not zero: LayerNorm maps a zero token to zero, whose query cannot learn.
    self.cls = (nnx.Param(0.02 * jax.random.normal(rngs.params(), (width,)))
                if pool == 'cls' else None)
    self.transformer = _Transformer(width, depth=depth, num_heads=num_heads, mlp_ratio=mlp_ratio,
                                    dtype=dtype, rngs=rngs)
    self.head = nnx.Linear(width, out_dim, dtype=dtype, rngs=rngs)

  def __call__(self, tokens: jax.Array, mask: jax.Array) -> jax.Array:
    if tokens.shape[1] > self.max_len:
      raise ValueError(f'{tokens.shape[1]} tokens exceed max_len={self.max_len}')
    mask = mask.astype(bool)
    x = self.embed(tokens) + self.pos[: tokens.shape[1]].astype(self.dtype)
    if self.cls is not None:
      cls = jnp.broadcast_to(self.cls[...].astype(self.dtype), (x.shape[0], 1, x.shape[-1]))
      x = jnp.concatenate([cls, x], axis=1)
      mask = jnp.concatenate([jnp.ones_like(mask[:, :1]), mask], axis=1)
    x = self.transformer(x, mask)
    pooled = x[:, 0].astype(jnp.float32) if self.cls is not None else masked_mean(x, mask)
    return self.head(pooled.astype(self.dtype)).astype(jnp.float32)


class AudioEncoder(nnx.Module):
  """Log-mel features (B, T, num_mels) with mask (B, T) bool -> (B, out_dim).

  A 1D conv stack along time: conv `i` has `widths[i]` channels, kernel `kernel_size`
  and stride `strides[i]`, then LayerNorm over channels (per frame, so statistics never
  mix frames) and gelu. The mask follows the convs as `mask[:, ::stride]`; a frame kept
  after a conv is one whose first input frame was valid. Inputs outside the mask are set
  to zero before every conv, and each conv pads a fixed `(kernel_size - 1) // 2` frames on
  the left, so a padded clip gives the same output as the same clip cut to its length.
  Then `depth` transformer blocks (sinusoidal positions, masked attention), masked mean
  pooling, Linear to `out_dim`.
  """

  def __init__(
      self,
      *,
      out_dim: int,
      num_mels: int = 64,
      widths: Sequence[int] = (64, 128, 128),
      strides: Sequence[int] = (2, 2, 2),
      kernel_size: int = 3,
      depth: int = 1,
      num_heads: int = 4,
      mlp_ratio: float = 2.0,
      dtype: Dtype = jnp.float32,
      rngs: nnx.Rngs,
  ):
    if len(widths) != len(strides):
      raise ValueError(f'widths {tuple(widths)} and strides {tuple(strides)} differ in length')
    if not widths:
      raise ValueError('widths must name at least one conv')
    self.out_dim = out_dim
    self.strides = tuple(strides)
    self.dtype = dtype
    lo = (kernel_size - 1) // 2
    padding = [(lo, kernel_size - 1 - lo)]
    convs, norms = [], []
    cin = num_mels
    for w, s in zip(widths, strides):
      convs.append(nnx.Conv(cin, w, (kernel_size,), strides=s, padding=padding, dtype=dtype,
                            rngs=rngs))
      norms.append(nnx.LayerNorm(w, dtype=dtype, rngs=rngs))
      cin = w
    self.convs, self.norms = nnx.List(convs), nnx.List(norms)
    self.transformer = (
        _Transformer(cin, depth=depth, num_heads=num_heads, mlp_ratio=mlp_ratio, dtype=dtype,
                     rngs=rngs) if depth else nnx.LayerNorm(cin, dtype=dtype, rngs=rngs))
    self.depth = depth
    self.head = nnx.Linear(cin, out_dim, dtype=dtype, rngs=rngs)

  def frame_mask(self, mask: jax.Array) -> jax.Array:
    """The mask over the frames left after the conv stack."""
    for s in self.strides:
      mask = mask[:, ::s]
    return mask

  def __call__(self, features: jax.Array, mask: jax.Array) -> jax.Array:
    mask = mask.astype(bool)
    x = features.astype(self.dtype)
    for conv, norm, s in zip(self.convs, self.norms, self.strides):
      x = jnp.where(mask[..., None], x, 0)
      x = nnx.gelu(norm(conv(x)))
      mask = mask[:, ::s]
    if self.depth:
      x = x + sinusoidal_positions(x.shape[1], x.shape[2]).astype(self.dtype)
      x = self.transformer(x, mask)
    else:
      x = self.transformer(x)
    return self.head(masked_mean(x, mask).astype(self.dtype)).astype(jnp.float32)


def _pretrained(kind: str) -> Callable[..., nnx.Module]:
  """Registry entry for a pretrained Hugging Face encoder (see `pretrained.py`)."""

  def build(*, path: str, trainable: bool, dtype: Dtype = jnp.float32,
            rngs: nnx.Rngs | None = None, **options) -> nnx.Module:
    del rngs  # the weights come from `path`
    # Imported here, not at the top: `pretrained` imports this module.
    from cmhn_jax.models import pretrained  # pylint: disable=g-import-not-at-top
    return pretrained.load_pretrained_encoder(kind, path, trainable=trainable, dtype=dtype,
                                              **options)

  build.__name__ = build.__qualname__ = f'build_{kind}'
  build.__doc__ = f'Loads the {kind!r} encoder; see pretrained.load_pretrained_encoder.'
  return build


def _signature(factory: Callable[..., Any]) -> inspect.Signature:
  """The keyword signature of a factory (a class's `__init__` minus `self`)."""
  if isinstance(factory, type):  # nnx.Module's metaclass hides the __init__ signature
    sig = inspect.signature(factory.__init__)
    return sig.replace(parameters=list(sig.parameters.values())[1:])
  return inspect.signature(factory)


def _image(kind):
  def build(**kwargs):
    if 'kind' in kwargs:
      raise TypeError(f"'kind' is fixed to {kind!r} by the encoder name")
    return ImageEncoder(kind=kind, **kwargs)
  build.__signature__ = _signature(ImageEncoder)
  return build


ENCODERS: dict[str, Callable[..., nnx.Module]] = {
    'image_cnn': _image('cnn'),
    'image_vit': _image('vit'),
    'text_transformer': TextEncoder,
    'audio_conv': AudioEncoder,
    'clip_vision': _pretrained('clip_vision'),
    'clip_text': _pretrained('clip_text'),
    'bert': _pretrained('bert'),
    'wav2vec2': _pretrained('wav2vec2'),
}


def build_encoder(name: str, *, rngs: nnx.Rngs | None = None, **kwargs) -> nnx.Module:
  """Builds the encoder registered as `name` with keyword arguments from the config.

  From-scratch encoders need `rngs`; pretrained ones take `path` and `trainable` and
  ignore `rngs`.
  """
  try:
    factory = ENCODERS[name]
  except KeyError:
    raise ValueError(f'unknown encoder {name!r}; known encoders: {sorted(ENCODERS)}') from None
  params = _signature(factory).parameters
  if not any(p.kind is p.VAR_KEYWORD for p in params.values()):
    accepted = sorted(k for k in params if k != 'rngs')
    unknown = sorted(set(kwargs) - set(accepted))
    if unknown:
      raise TypeError(f'encoder {name!r} got unknown argument(s) {unknown}; it accepts {accepted}')
  if params['rngs'].default is inspect.Parameter.empty and rngs is None:
    raise TypeError(f'encoder {name!r} is initialised randomly and needs rngs=nnx.Rngs(...)')
  return factory(rngs=rngs, **kwargs)
