"""``data.source: hf_datasets``: prepared samples (:mod:`dfm.ports.samples`) in a local Hugging Face dataset.

:class:`HFDatasetSource` is the :class:`~dfm.ports.data.DataSource` (``save_to_disk`` directories or
parquet files); :func:`webdataset_to_hf` converts prepared webdataset shards into such a dataset.
"""

from dfm.adapters.hf_datasets.convert import webdataset_to_hf
from dfm.adapters.hf_datasets.samples import BadSampleError
from dfm.adapters.hf_datasets.source import HFDatasetSource
from dfm.adapters.hf_datasets.table import load_table

__all__ = ["BadSampleError", "HFDatasetSource", "load_table", "webdataset_to_hf"]
