"""Folder of the local ``f1`` evaluate module (``f1.py``).

Load it with ``prune_callbacks.assets.load_metric("f1")``; this
``__init__`` only makes setuptools package the folder.
"""
