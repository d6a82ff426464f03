"""voltool: named, versioned volumes for a fleet, with Modal's Volume API.

>>> import voltool
>>> vol = voltool.Volume.from_name("model-store", create_if_missing=True)
>>> with vol.batch_upload() as batch:
...     batch.put_file("weights.bin", "/models/v1/weights.bin")
>>> [e.path for e in vol.listdir("/models/v1")]
['models/v1/weights.bin']

The package talks to the voltool agent of this host over its control socket, as the
``voltool`` command does; see :class:`Volume`.
"""

from . import exception
from .volume import FileEntry, FileEntryType, Volume, VolumeUploadContext

__all__ = ["Volume", "FileEntry", "FileEntryType", "VolumeUploadContext", "exception"]
