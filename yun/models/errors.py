"""Errors of checkpoint loading (both HF folders and GGUF files)."""


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded; the message names the file and the tensor."""
