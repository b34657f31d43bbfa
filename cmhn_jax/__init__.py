"""Cross-Modal Harmonic Networks (CMHN) in JAX.

The associative-memory core is importable on its own:

  from cmhn_jax import energy, retrieval
"""

__version__ = "0.1.0"
