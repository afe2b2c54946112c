"""Files written whole: through a temporary file beside the target, then a rename.

`tempfile.mkstemp` creates its file 0600. A model or adapter published that way could be read
by nobody but its writer: not a service user, not a container's unprivileged user (a fed node
failed its pre-flight check on exactly that). The file gets the mode a plain `open()` would
give it, 0666 less the umask, before it takes the target's name.
"""

from __future__ import annotations

import os


def umask_mode() -> int:
    """0666 less the process's umask (read by setting it, then putting it back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o666 & ~mask


def publish(tmp: str | os.PathLike[str], path: str | os.PathLike[str]) -> None:
    """Rename a finished temporary file onto `path`, readable as a newly created file is."""
    os.chmod(tmp, umask_mode())
    os.replace(tmp, path)

