"""The pruning methods the engine composes, each behind a registry seam: saliencies (how weights are scored),
schedules (how sparsity rises), selection (which weights to prune, exactly), granularities (the shape of a
mask: unstructured, N:M, structured units), the unit descriptions of architectures, and the step components
that ride the optimizer step. A new granularity goes in ``granularity/``, a new saliency in ``saliency.py``."""
