"""Encoders: small ones trained from scratch and pretrained Hugging Face Flax models.

  from cmhn_jax.models import build_encoder
  enc = build_encoder('text_transformer', out_dim=128, vocab_size=256, rngs=nnx.Rngs(0))
"""

from cmhn_jax.models.encoders import ENCODERS, build_encoder
from cmhn_jax.models.pretrained import load_pretrained_encoder

__all__ = ['ENCODERS', 'build_encoder', 'load_pretrained_encoder']
