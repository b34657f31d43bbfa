"""Tests of the from-scratch encoders and the encoder registry."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from cmhn_jax.models import ENCODERS, build_encoder
from cmhn_jax.models import encoders

B = 3
TINY = {
    'image_cnn': dict(out_dim=16, widths=(8, 16), stem_patch=4, num_groups=4, stage_depth=1),
    'image_vit': dict(out_dim=16, patch_size=8, width=16, depth=1, num_heads=2, image_size=32,
                      pool='cls'),
    'text_transformer': dict(out_dim=16, vocab_size=50, max_len=12, width=16, depth=2,
                             num_heads=2),
    'audio_conv': dict(out_dim=16, num_mels=8, widths=(16, 16), strides=(2, 2), depth=1,
                       num_heads=2),
}


def _inputs(name, key=0):
  k1, k2 = jax.random.split(jax.random.key(key))
  if name.startswith('image'):
    return (jax.random.uniform(k1, (B, 32, 32, 3)),)
  if name == 'text_transformer':
    tokens = jax.random.randint(k1, (B, 12), 1, 50)
    lengths = jnp.array([12, 5, 1])
    return tokens, jnp.arange(12)[None] < lengths[:, None]
  feats = jax.random.normal(k1, (B, 40, 8))
  lengths = jnp.array([40, 23, 9])
  return feats, jnp.arange(40)[None] < lengths[:, None]


# Jitted: eager op-by-op execution (and its per-primitive compiles) is far slower here.
_forward = nnx.jit(lambda model, *args: model(*args))


def _build(name, **overrides):
  return _build_cached(name, tuple(sorted(overrides.items())))


@functools.cache  # tests only read the models; building one costs seconds of compiles
def _build_cached(name, overrides):
  return build_encoder(name, rngs=nnx.Rngs(0), **{**TINY[name], **dict(overrides)})


@pytest.mark.parametrize('name', sorted(TINY))
def test_shape_dtype_and_every_param_gets_gradient(name):
  model = _build(name)
  args = _inputs(name)
  out = _forward(model, *args)
  chex.assert_shape(out, (B, 16))
  assert out.dtype == jnp.float32
  chex.assert_tree_all_finite(out)
  assert model.out_dim == 16

  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  grads = jax.jit(jax.grad(lambda p: jnp.sum(nnx.merge(graphdef, p, rest)(*args) ** 2)))(params)
  # A key bias adds the same q.b to every score of a query: softmax ignores it.
  dead = [jax.tree_util.keystr(path) for path, g in jax.tree_util.tree_leaves_with_path(grads)
          if not np.any(np.asarray(g)) and "['key']['bias']" not in jax.tree_util.keystr(path)]
  assert not dead, f'parameters disconnected from the output: {dead}'


@pytest.mark.parametrize('name', sorted(TINY))
def test_bfloat16_compute_keeps_float32_params_and_outputs(name):
  model = _build(name, dtype=jnp.bfloat16)
  assert {p.dtype for p in jax.tree.leaves(nnx.state(model, nnx.Param))} == {jnp.dtype(jnp.float32)}
  jaxpr = jax.make_jaxpr(lambda *a: model(*a))(*_inputs(name))  # traced, not compiled
  chex.assert_shape(jaxpr.out_avals[0], (B, 16))
  assert jaxpr.out_avals[0].dtype == jnp.float32
  assert 'bf16' in str(jaxpr)  # the matmuls / convs really run in bfloat16


@pytest.mark.parametrize('pool', ['mean', 'cls'])
def test_text_padded_tokens_never_matter(pool):
  model = _build('text_transformer', pool=pool)
  tokens, mask = _inputs('text_transformer')
  out = _forward(model, tokens, mask)
  other = jnp.where(mask, tokens, jax.random.randint(jax.random.key(7), tokens.shape, 0, 50))
  assert np.any(np.asarray(other != tokens))
  np.testing.assert_array_equal(_forward(model, other, mask), out)
  # A valid token does matter (the test above could otherwise pass trivially).
  changed = _forward(model, tokens.at[1, 0].set((tokens[1, 0] + 1) % 50), mask)
  assert not np.allclose(changed[1], out[1])
  np.testing.assert_array_equal(changed[0], out[0])


def test_text_rejects_sequences_longer_than_max_len():
  model = _build('text_transformer')
  with pytest.raises(ValueError, match='max_len'):
    model(jnp.zeros((1, 13), jnp.int32), jnp.ones((1, 13), bool))


def test_audio_padded_frames_never_matter():
  model = _build('audio_conv')
  feats, mask = _inputs('audio_conv')
  out = _forward(model, feats, mask)
  noise = 100.0 * jax.random.normal(jax.random.key(3), feats.shape)
  other = jnp.where(mask[..., None], feats, noise)
  np.testing.assert_array_equal(_forward(model, other, mask), out)
  # NaNs in the padding cannot leak either.
  nans = jnp.where(mask[..., None], feats, jnp.nan)
  np.testing.assert_array_equal(_forward(model, nans, mask), out)
  # A valid frame does matter.
  changed = _forward(model, feats.at[2, 0].add(1.0), mask)
  assert not np.allclose(changed[2], out[2])


def test_audio_padding_a_clip_equals_cutting_it():
  model = _build('audio_conv')
  feats, mask = _inputs('audio_conv')
  out = _forward(model, feats, mask)
  for i, length in [(1, 23), (2, 9)]:
    alone = _forward(model, feats[i:i + 1, :length], jnp.ones((1, length), bool))
    np.testing.assert_allclose(alone[0], out[i], rtol=1e-5, atol=1e-5)


def test_audio_frame_mask_follows_the_strides():
  model = _build('audio_conv', widths=(16, 16, 16), strides=(2, 3, 1))
  mask = jnp.arange(40)[None] < jnp.array([[40], [23], [1]])
  frames = model.frame_mask(mask)
  chex.assert_shape(frames, (3, 7))  # ceil(ceil(40 / 2) / 3)
  np.testing.assert_array_equal(frames.sum(1), [7, 4, 1])  # ceil(ceil(n / 2) / 3)


def test_image_encoder_arguments_are_checked():
  with pytest.raises(TypeError, match='patch_size'):
    build_encoder('image_cnn', out_dim=8, patch_size=4, rngs=nnx.Rngs(0))
  with pytest.raises(TypeError, match='widths'):
    encoders.ImageEncoder(out_dim=8, kind='vit', widths=(8,), rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="'cnn' or 'vit'"):
    encoders.ImageEncoder(out_dim=8, kind='resnet', rngs=nnx.Rngs(0))
  with pytest.raises(TypeError, match='kind'):
    build_encoder('image_vit', out_dim=8, kind='cnn', rngs=nnx.Rngs(0))
  vit = _build('image_vit')
  with pytest.raises(ValueError, match='32x32'):
    vit(jnp.zeros((1, 64, 64, 3)))


def test_cnn_max_pool_is_checked_and_trains_every_param():
  model = _build('image_cnn', pool='max')
  (x,) = _inputs('image_cnn')
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  grads = jax.jit(jax.grad(lambda p: jnp.sum(nnx.merge(graphdef, p, rest)(x) ** 2)))(params)
  assert all(np.any(np.asarray(g)) for g in jax.tree_util.tree_leaves(grads))
  # Same weights (same seed), another pooling: the option is really used.
  mean = _build('image_cnn')
  assert not np.allclose(_forward(model, x), _forward(mean, x))
  with pytest.raises(ValueError, match='pool must be one of'):
    _build('image_cnn', pool='cls')


def test_registry_errors_name_the_problem():
  assert {'image_cnn', 'image_vit', 'text_transformer', 'audio_conv', 'clip_vision',
          'clip_text', 'bert', 'wav2vec2'} <= set(ENCODERS)
  with pytest.raises(ValueError, match="unknown encoder 'resnet'.*image_cnn"):
    build_encoder('resnet', rngs=nnx.Rngs(0))
  with pytest.raises(TypeError, match="'widht'"):
    build_encoder('audio_conv', out_dim=8, widht=3, rngs=nnx.Rngs(0))
  with pytest.raises(TypeError, match="'vocab'"):
    build_encoder('text_transformer', out_dim=8, vocab=3, rngs=nnx.Rngs(0))
  with pytest.raises(TypeError, match='rngs'):
    build_encoder('text_transformer', out_dim=8, vocab_size=3)


def test_masked_mean_skips_masked_values():
  x = jnp.array([[[1.0], [3.0], [jnp.nan]], [[2.0], [jnp.inf], [4.0]]])
  mask = jnp.array([[True, True, False], [False, False, False]])
  np.testing.assert_array_equal(encoders.masked_mean(x, mask), [[2.0], [0.0]])
