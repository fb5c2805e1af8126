"""``resumer serve``: the read-only pull-through mirror (``mirror.py``) and the daemon that
holds the root while it runs (``daemon.py``)."""
