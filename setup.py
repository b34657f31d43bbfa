"""cmhn_jax: Cross-Modal Harmonic Networks in JAX/Flax."""

import setuptools

# Versions tested together offline on Python 3.11 (see README.md).
INSTALL_REQUIRES = [
    "jax==0.10.2",
    "jaxlib==0.10.2",
    "flax==0.12.8",
    "optax==0.2.8",
    "orbax-checkpoint==0.12.8",
    "grain==0.2.18",
    "chex==0.1.92",
    "ml_collections==1.1.0",
    "absl-py==2.5.1",
    "tensorflow-datasets==4.9.10",
    "transformers==4.57.6",
    "numpy>=1.26",
    "pillow>=10",
    "matplotlib>=3.8",
    "espeakng-loader>=0.2.4",
    "tensorboardX>=2.6",
]

EXTRAS_REQUIRE = {
    "test": ["pytest>=8", "portpicker>=1.5"],
    # FAISS is only the reference point of benchmarks/retrieval.py.
    "benchmark": ["faiss-cpu>=1.8"],
}

setuptools.setup(
    name="cmhn_jax",
    version="0.1.0",
    description="Cross-Modal Harmonic Networks: multimodal modern-Hopfield associative memory in JAX.",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=setuptools.find_packages(include=["cmhn_jax", "cmhn_jax.*"]),
    python_requires=">=3.11",
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS_REQUIRE,
)
