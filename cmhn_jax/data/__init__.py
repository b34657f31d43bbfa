"""Input data: datasets (shapes, COCO captions, manifests) and grain pipelines.

    from cmhn_jax import data
    cfg = data.default_data_config("shapes")      # or 'coco', 'coco_raw', ...
    data.prepare(cfg)                             # optional: done on first use
    pipe = data.get_pipeline(cfg, "train", train=True, global_batch_size=256)
    for batch in pipe: ...                        # dicts of numpy arrays
    batch = data.to_global_batch(batch, mesh)     # dicts of global jax.Arrays

Command line: `python -m cmhn_jax.data --name=shapes --builder_config=default`.
"""

from cmhn_jax.data.config import default_data_config
from cmhn_jax.data.config import default_data_dir
from cmhn_jax.data.pipeline import DataInfo
from cmhn_jax.data.pipeline import DataPipeline
from cmhn_jax.data.pipeline import get_pipeline
from cmhn_jax.data.pipeline import prepare
from cmhn_jax.data.pipeline import to_global_batch
from cmhn_jax.data.sources import DATASETS

__all__ = [
    "DATASETS",
    "DataInfo",
    "DataPipeline",
    "default_data_config",
    "default_data_dir",
    "get_pipeline",
    "prepare",
    "to_global_batch",
]
