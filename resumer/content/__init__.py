"""Content: the one owner of ``blobs/`` (see ``blobs.py``).

Partials (the chunk maps under ``ingest/``) live in ``resumer/ingest.py`` for now; once
its ``Partial.commit`` calls ``ContentStore.commit_file``, every blob enters through here.
"""

from .blobs import ContentStore, copy_into

__all__ = ["ContentStore", "copy_into"]
