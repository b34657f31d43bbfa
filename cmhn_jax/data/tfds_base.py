"""The base of this package's TFDS builders: offline, in order, no TensorFlow."""

import os

from absl import logging
from array_record.python import array_record_module
import tensorflow_datasets as tfds
from tensorflow_datasets.core import example_serializer
from tensorflow_datasets.core import naming
from tensorflow_datasets.core import splits as splits_lib


class OfflineBuilder(tfds.core.GeneratorBasedBuilder):
  """A GeneratorBasedBuilder that downloads nothing and writes in order.

  Two departures from TFDS's own generation, both to stay free of TensorFlow:

  - Splits are written straight to one array_record file each, in the order
    the generator yields them (so record i is example i). TFDS's writer
    hash-shuffles through a buffer that spills to disk with `tf.io.gfile` once
    a split passes 1 GB, which needs TensorFlow (COCO's train split is ~18 GB).
    The result is a normal TFDS directory: `tfds.builder_from_directory` and
    `as_data_source` read it; `download_and_prepare` still writes it in a
    temporary folder that is renamed at the end, so an interrupted run leaves
    nothing that looks prepared.
  - TFDS looks for a download-checksums file beside a builder's code, and for
    a builder inside a package that lookup imports `importlib_resources`,
    which tensorflow-datasets 4.9.10 does not install on Python >= 3.9. Our
    builders download nothing, hence have no checksums file: `code_path` says
    so.
  """

  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls):  # pylint: disable=invalid-overridden-method
    return None

  def _generate_splits(self, dl_manager, download_config):
    del download_config
    features = self.info.features
    serializer = example_serializer.ExampleSerializer(features.get_serialized_info())
    suffix = tfds.core.file_adapters.FileFormat.ARRAY_RECORD.file_suffix
    split_infos = []
    for split, examples in self._split_generators(dl_manager).items():
      template = naming.ShardedFileTemplate(
          data_dir=self.data_path, dataset_name=self.name, split=split,
          filetype_suffix=suffix)
      path = template.sharded_filepath(shard_index=0, num_shards=1)
      writer = array_record_module.ArrayRecordWriter(os.fspath(path), "group_size:1")
      count = num_bytes = 0
      try:
        for _, example in examples:
          record = serializer.serialize_example(features.encode_example(example))
          writer.write(record)
          count += 1
          num_bytes += len(record)
      finally:
        writer.close()
      logging.info("%s/%s: wrote %d examples", self.name, split, count)
      split_infos.append(splits_lib.SplitInfo(
          name=split, shard_lengths=[count], num_bytes=num_bytes,
          filename_template=template))
    return split_infos
