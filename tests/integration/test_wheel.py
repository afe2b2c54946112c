"""The wheel carries playbooks and templates, and `claw` works from it outside the repository."""

from __future__ import annotations

import json
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("dist")
    subprocess.run([sys.executable, "-m", "build", "--wheel", "--outdir", str(out), str(REPO)],
                   check=True, capture_output=True, timeout=600)
    (found,) = out.glob("clawforge-*.whl")
    return found


def _shipped(folder: str, patterns: tuple[str, ...]) -> set[str]:
    base = REPO / folder
    return {str(p.relative_to(REPO)) for pattern in patterns for p in base.rglob(pattern)
            if p.is_file() and "__pycache__" not in p.parts}


def test_wheel_carries_playbooks_templates_and_data(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    wanted = (_shipped("playbooks", ("*",)) | _shipped("images/templates", ("*",))
              | _shipped("provision/data", ("*.yml",)) | _shipped("runtime", ("*.cl",))
              | _shipped("provision/dashboard", ("*.html", "*.css", "*.js")))
    assert "playbooks/doctor.yml" in wanted
    assert "provision/dashboard/templates/devices.html" in wanted
    assert wanted <= names, sorted(wanted - names)
    modules = {m for pkg in ("provision", "images", "runtime") for m in _shipped(pkg, ("*.py",))}
    assert "runtime/server/app.py" in modules
    assert modules <= names, f"packages missing from pyproject: {sorted(modules - names)}"


def test_claw_runs_from_the_wheel_outside_the_repository(wheel, tmp_path):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q"]
    subprocess.run([*pip, str(wheel)], check=True, timeout=600, capture_output=True)
    claw = str(venv / "bin" / "claw")
    run = {"capture_output": True, "text": True, "cwd": tmp_path, "timeout": 120,
           "env": {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "COLUMNS": "200"}}
    helped = subprocess.run([claw, "--help"], **run)
    assert helped.returncode == 0 and "profiles" in helped.stdout
    listed = subprocess.run([claw, "profiles", "list", "--json"], **run)
    assert listed.returncode == 0
    assert "rk3588" in {p["name"] for p in json.loads(listed.stdout)}
    inventory = tmp_path / "fleet.yml"
    inventory.write_text((REPO / "examples" / "fleet.yml").read_text())
    checked = subprocess.run([claw, "inventory", "check", str(inventory), "--json"], **run)
    assert checked.returncode == 0, checked.stderr
    where = subprocess.run([str(venv / "bin" / "python"), "-c",
                            "import playbooks, provision; print(provision.__file__); "
                            "from provision.ansible import playbooks_dir; "
                            "print((playbooks_dir() / 'doctor.yml').is_file())"], **run)
    installed, has_playbook = where.stdout.split()
    assert installed.startswith(str(venv)) and has_playbook == "True"
