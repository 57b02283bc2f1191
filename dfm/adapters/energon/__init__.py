"""``data.source: energon``: prepared webdataset shards (the :mod:`dfm.ports.samples` format) via megatron-energon.

:class:`EnergonSource` is the :class:`~dfm.ports.data.DataSource`; :class:`DfmTaskEncoder` the energon
task encoder it uses; :func:`write_fake_dataset` writes random samples of any shape in the same format
(for benchmarks); :mod:`~dfm.adapters.energon.state_codec` converts energon loader states to JSON.
"""

from dfm.adapters.energon.fake import write_fake_dataset, write_shards
from dfm.adapters.energon.source import EnergonSource, check_prepared
from dfm.adapters.energon.task_encoder import BadSampleError, DfmTaskEncoder

__all__ = [
    "BadSampleError",
    "DfmTaskEncoder",
    "EnergonSource",
    "check_prepared",
    "write_fake_dataset",
    "write_shards",
]
