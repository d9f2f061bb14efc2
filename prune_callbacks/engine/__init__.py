"""The engine: `Pruner` composes a config's methods into step components on the optimizer step, and its
state (masks, saliency buffers, counters) is taken and restored in :mod:`.state`."""
