"""Errors the runtime raises for bad model files and requests: one clear line each."""


class ModelError(ValueError):
    """A model file, directory or request that cannot be used; the message says why."""


class DeviceError(ModelError):
    """The model is fine but this machine cannot run it as asked (no OpenCL device): exit 1."""

    exit_code = 1
