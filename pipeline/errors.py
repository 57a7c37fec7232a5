"""The one error type users see: a one-line message naming the bad input, raised before long work."""


class PipelineError(Exception):
    """Bad params, data or checkpoints. Stage CLIs print `error: <message>` and exit with status 2."""
