"""The ClawForge wheel that images install, built from this source tree and cached by its hash.

Images install the project the way a user would (a wheel with an extra), never a copy of the
repository. The wheel is rebuilt only when a file that goes into it changed, so a cached image
rebuild finds the same wheel bytes and Docker reuses its layers.
"""

from __future__ import annotations

import fcntl
import hashlib
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from images.render import wheel_name
from provision.errors import ClawError
from provision.paths import state_dir

PACKAGES = ("provision", "images", "runtime", "playbooks")
TOP_FILES = ("pyproject.toml", "README.md", "LICENSE")


def source_root() -> Path:
    """The source tree this code runs from (an installed wheel has none)."""
    root = Path(__file__).resolve().parent.parent
    if not (root / "pyproject.toml").is_file():
        raise ClawError(f"{root}: no pyproject.toml; building an image needs the ClawForge "
                        "source tree (run `claw image build` from a checkout)")
    return root


def source_hash(root: Path) -> str:
    digest = hashlib.sha256()
    files = [root / name for name in TOP_FILES if (root / name).is_file()]
    for package in PACKAGES:
        files += [p for p in (root / package).rglob("*") if p.is_file()
                  and "__pycache__" not in p.parts and p.suffix not in (".pyc", ".pyo")]
    for path in sorted(files):
        digest.update(str(path.relative_to(root)).encode() + b"\0")
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def ensure_wheel(progress=print) -> Path:
    """The wheel for the current source, built with `python -m build --wheel` unless cached."""
    root = source_root()
    key = source_hash(root)
    folder = state_dir() / "images" / "wheels" / key
    wheel = folder / wheel_name()
    if wheel.is_file():
        return wheel
    folder.parent.mkdir(parents=True, exist_ok=True)
    # setuptools builds in the source tree's build/: one build at a time from this machine
    # (two image builds at once raced there, one deleting what the other was building).
    with open(folder.parent / ".build.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if wheel.is_file():  # built by whoever held the lock before us
            return wheel
        return _build_wheel(root, folder, key, progress)


def _build_wheel(root: Path, folder: Path, key: str, progress=print) -> Path:
    wheel = folder / wheel_name()
    progress(f"building {wheel_name()} (source {key})")
    with tempfile.TemporaryDirectory(prefix="claw-wheel-", dir=folder.parent) as tmp:
        out = Path(tmp) / "dist"
        # setuptools' build/ would carry files deleted since the last build into the wheel:
        # start from none. --no-isolation reuses this environment's setuptools.
        shutil.rmtree(root / "build", ignore_errors=True)
        done = subprocess.run([sys.executable, "-m", "build", "--wheel", "--no-isolation",
                               "--outdir", str(out), str(root)],
                              capture_output=True, text=True, timeout=600)
        built = out / wheel_name()
        if done.returncode != 0 or not built.is_file():
            tail = " | ".join((done.stderr or done.stdout).strip().splitlines()[-3:])
            raise ClawError(f"building the wheel failed: {tail}")
        shutil.rmtree(root / "build", ignore_errors=True)
        staged = Path(tmp) / "staged"
        staged.mkdir()
        shutil.move(str(built), staged / wheel_name())
        if folder.exists():
            shutil.rmtree(folder)
        staged.rename(folder)
    return wheel
