"""Folder of the local ``accuracy`` evaluate module (``accuracy.py``).

Load it with ``prune_callbacks.assets.load_metric("accuracy")``; this
``__init__`` only makes setuptools package the folder.
"""
