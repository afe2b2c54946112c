"""Files published through a temporary file keep the mode a plain open() gives."""

from __future__ import annotations

import os

import numpy as np
import pytest

from runtime.convert import gguf_output
from runtime.files import publish, umask_mode

pytestmark = pytest.mark.unit


def test_a_written_gguf_is_readable_as_a_new_file_is(tmp_path):
    """mkstemp makes 0600: a model only its writer could read (a fed node's unprivileged
    user could not open it)."""
    out = tmp_path / "m.gguf"
    with gguf_output(out, "llama") as writer:
        writer.add_tensor("t", np.zeros(4, np.float32))
    assert out.stat().st_mode & 0o777 == umask_mode() and umask_mode() & 0o044 == 0o044


def test_publish_applies_the_umask(tmp_path):
    old = os.umask(0o027)
    try:
        tmp = tmp_path / ".x.tmp"
        tmp.write_bytes(b"x")
        tmp.chmod(0o600)
        publish(tmp, tmp_path / "x")
        assert (tmp_path / "x").stat().st_mode & 0o777 == 0o640 and not tmp.exists()
    finally:
        os.umask(old)
