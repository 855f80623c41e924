"""Framework glue, published as ``fp_collect.adapters``: ``asgi`` and ``wsgi``."""
