"""The inference runtime that runs on devices: models, backends, scheduler, server."""

__version__ = "0.1.0"
