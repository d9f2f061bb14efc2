"""Primitives that know no pruning method: the validated config models and their errors, the registry of
named parts, which weights are targets, counting and reports, the log-key schema, state files on disk and
process helpers. Everything else in the package imports from here; this layer imports nothing above it."""
