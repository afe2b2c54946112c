"""`claw image export|import|push` on a real Docker engine: round trip with the same image id, a
damaged or unchecked tarball refused, a full disk leaving nothing behind, and a push to a real
registry (Debian's docker-registry, the CNCF distribution server, on a loopback port)."""

from __future__ import annotations

import io
import json
import os
import subprocess
import tarfile
import urllib.request
import uuid

import pytest

from images.base import docker_client
from provision.loopback import free_ports
from tests.registry import local_registry

pytestmark = pytest.mark.integration

PREFIX = "claw-imgtest-transfer"


@pytest.fixture
def tiny_image():
    """A two-file image (6 MiB of random bytes: zstd cannot shrink it) made by docker import."""
    client = docker_client()
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in (("payload.bin", os.urandom(6 << 20)), ("hello.txt", b"hello\n")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    tag = f"{PREFIX}-{uuid.uuid4().hex[:8]}:1"
    repository, version = tag.split(":")
    client.api.import_image_from_data(buf.getvalue(), repository=repository, tag=version)
    image_id = client.images.get(tag).id
    yield tag, image_id
    for image in client.images.list(name=repository):
        client.images.remove(image.id, force=True)


def test_export_remove_import_gives_back_the_same_image(claw, tiny_image, tmp_path):
    tag, image_id = tiny_image
    out = tmp_path / "tiny.tar.zst"
    result = claw("image", "export", tag, "-o", str(out))
    assert result.code == 0, result.err
    sums = (tmp_path / "tiny.tar.zst.sha256").read_text().split()
    assert sums[1] == out.name
    assert subprocess.run(["sha256sum", "-c", out.name + ".sha256"], cwd=tmp_path,
                          capture_output=True).returncode == 0
    assert subprocess.run(["zstd", "-t", str(out)], capture_output=True).returncode == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny.tar.zst", "tiny.tar.zst.sha256"]
    client = docker_client()
    client.images.remove(tag, force=True)
    assert not client.images.list(name=tag)
    result = claw("image", "import", str(out))
    assert result.code == 0, result.err
    assert f"loaded {tag}" in result.out
    assert client.images.get(tag).id == image_id


def test_damaged_or_unchecked_tarball_is_refused(claw, tiny_image, tmp_path):
    tag, _ = tiny_image
    out = tmp_path / "tiny.tar.zst"
    assert claw("image", "export", tag, "-o", str(out)).code == 0
    data = bytearray(out.read_bytes())
    data[len(data) // 2] ^= 0xFF
    out.write_bytes(bytes(data))
    result = claw("image", "import", str(out))
    assert result.code == 2 and "does not match tiny.tar.zst.sha256" in result.err
    assert "damaged or incomplete" in result.err
    (tmp_path / "tiny.tar.zst.sha256").unlink()
    result = claw("image", "import", str(out))
    assert result.code == 2 and "checksum file missing" in result.err
    result = claw("image", "import", str(out), "--no-verify")
    assert result.code == 2 and "not a valid zstd stream" in result.err  # its own checksum


def test_unknown_image_is_bad_input(claw, tmp_path):
    result = claw("image", "export", f"{PREFIX}-missing:0", "-o", str(tmp_path / "x.tar.zst"))
    assert result.code == 2 and "not found" in result.err
    assert not list(tmp_path.iterdir())


def test_disk_full_during_export_leaves_nothing_behind(claw, tiny_image, tmp_path):
    tag, _ = tiny_image
    small = tmp_path / "small"
    small.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(small)], check=True)
    try:
        result = claw("image", "export", tag, "-o", str(small / "tiny.tar.zst"))
        assert result.code == 1
        assert "no space left on device" in result.err and "nothing was written" in result.err
        assert list(small.iterdir()) == []
    finally:
        subprocess.run(["umount", str(small)], check=True)


@pytest.fixture
def registry(tmp_path):
    with local_registry(tmp_path / "registry") as address:
        yield address, f"http://{address}"


def test_push_to_a_registry(claw, tiny_image, registry):
    tag, _ = tiny_image
    address, url = registry
    result = claw("image", "push", tag, "--registry", address)
    assert result.code == 0, result.err
    repository, version = tag.split(":")
    assert f"pushed {address}/{tag}" in result.out
    tags = json.load(urllib.request.urlopen(f"{url}/v2/{repository}/tags/list", timeout=5))
    assert tags == {"name": repository, "tags": [version]}
    docker_client().images.remove(f"{address}/{tag}")


def test_push_to_an_unreachable_registry_fails_clearly(claw, tiny_image):
    tag, _ = tiny_image
    (port,) = free_ports(5200, 1, set())
    result = claw("image", "push", tag, "--registry", f"127.0.0.1:{port}")
    assert result.code == 1
    assert f"push of 127.0.0.1:{port}/{tag} failed:" in result.err
    assert "connection refused" in result.err and "Traceback" not in result.err
