"""Content: the one owner of ``blobs/`` and of the partials under ``ingest/``.

- ``blobs.py``: committed blobs: the one commit (fsync, size and digest check, rename,
  directory fsync), readers, copies out (reflink where the file system can).
- ``partial.py``: partials as chunk maps: written at offsets, verified on reopen, holes
  repaired, read while they grow; a finished one enters ``blobs/`` through
  ``ContentStore.commit_file``.
"""

from .blobs import ContentStore, copy_into

__all__ = ["ContentStore", "copy_into"]
