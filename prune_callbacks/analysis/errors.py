"""The one error the analysis raises for bad inputs."""


class AnalysisError(ValueError):
    """Inputs the analysis cannot work with (no batches, no targets, zero rows); the message says what to change."""
