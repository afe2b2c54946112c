"""Errors the runtime raises for bad model files and requests: one clear line each."""


class ModelError(ValueError):
    """A model file, directory or request that cannot be used; the message says why."""
