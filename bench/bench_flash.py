"""`claw flash` vs `dd bs=4M conv=fsync`: a 4 GiB GPT image holding 1 GiB of data, written to
a loop device, both measured in the same run.

Ours writes the block map's ranges with O_DIRECT and then reads every one back (its time
includes that verification, also reported alone); dd writes all 4 GiB and verifies nothing.
Each writer gets a fresh sparse backing file, so neither finds the other's blocks allocated;
with --repeat the order alternates (the shared machine's drift hits both) and the median
ratio is reported.
The target is ≥ 3× faster than dd (`ratio` = dd_s / ours_s).

    .venv/bin/python bench/bench_flash.py [--image-gib 4] [--data-gib 1] [--repeat 3] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.report import print_report  # noqa: E402

MIB = 1 << 20
CLAW = Path(sys.executable).parent / "claw"


def make_image(path: Path, image_bytes: int, data_bytes: int) -> None:
    """GPT + data spread in 64 MiB runs across the image (random: like a root filesystem
    after compression, it defeats any zero detection)."""
    with open(path, "wb") as f:
        f.truncate(image_bytes)
    subprocess.run(["sfdisk", "-q", str(path)], input="label: gpt\n,\n", text=True, check=True)
    runs = data_bytes // (64 * MIB)
    stride = (image_bytes - 2 * MIB) // runs // MIB * MIB
    with open(path, "r+b") as f:
        for i in range(runs):
            f.seek(MIB + i * stride)
            for _ in range(64):
                f.write(os.urandom(MIB))


def loop_target(path: Path, size: int) -> str:
    path.unlink(missing_ok=True)
    with open(path, "wb") as f:
        f.truncate(size)
    return subprocess.run(["losetup", "-f", "--show", str(path)], check=True, text=True,
                          capture_output=True).stdout.strip()


def timed(cmd: list[str]) -> tuple[float, str]:
    start = time.perf_counter()
    done = subprocess.run(cmd, check=True, text=True, capture_output=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    return time.perf_counter() - start, done.stdout


def measure(workdir: Path, image: Path, image_bytes: int, data_bytes: int, run: int) -> dict:
    row: dict = {"run": run, "image_gib": image_bytes / (1 << 30),
                 "data_gib": data_bytes / (1 << 30)}
    for who in ("ours", "dd") if run % 2 else ("dd", "ours"):  # alternate: drift hits both
        subprocess.run(["sync"], check=True)
        dev = loop_target(workdir / f"target-{who}", image_bytes)
        try:
            if who == "ours":
                wall, out = timed([str(CLAW), "flash", str(image), dev, "--json"])
                record = json.loads(out)
                row |= {"ours_s": round(wall, 2), "ours_write_s": round(record["write_s"], 2),
                        "ours_verify_s": round(record["verify_s"], 2),
                        "ours_written_gib": round(record["written_bytes"] / (1 << 30), 3)}
            else:
                wall, _ = timed(["dd", f"if={image}", f"of={dev}", "bs=4M", "conv=fsync",
                                 "status=none"])
                row["dd_s"] = round(wall, 2)
        finally:
            subprocess.run(["losetup", "-d", dev], check=False)
            (workdir / f"target-{who}").unlink(missing_ok=True)
    row["ratio"] = round(row["dd_s"] / row["ours_s"], 2)
    row["ours_mb_s"] = round(image_bytes / 1e6 / row["ours_s"], 1)  # effective, image bytes
    row["dd_mb_s"] = round(image_bytes / 1e6 / row["dd_s"], 1)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--image-gib", type=float, default=4)
    parser.add_argument("--data-gib", type=float, default=1)
    parser.add_argument("--dir", default="/var/tmp", help="where the image and targets live")
    parser.add_argument("--repeat", type=int, default=1, help="ours/dd pairs, one row each")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if os.geteuid() != 0 or not shutil.which("losetup"):
        raise SystemExit("bench_flash needs root and losetup (loop devices)")
    workdir = Path(tempfile.mkdtemp(prefix="clawbench-flash-", dir=args.dir))
    image_bytes, data_bytes = int(args.image_gib * (1 << 30)), int(args.data_gib * (1 << 30))
    try:
        image = workdir / "bench.img"
        make_image(image, image_bytes, data_bytes)
        start = time.perf_counter()
        subprocess.run([str(CLAW), "bmap", str(image)], check=True, capture_output=True,
                       env={**os.environ, "PYTHONPATH": str(ROOT)})
        bmap_s = round(time.perf_counter() - start, 2)
        rows = []
        for run in range(1, args.repeat + 1):
            rows.append(measure(workdir, image, image_bytes, data_bytes, run))
            print(f"# measured: {json.dumps(rows[-1])}", file=sys.stderr, flush=True)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    report = {"bench": "flash: claw flash (verified) vs dd bs=4M conv=fsync",
              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
              "machine": platform.machine(), "cpus": os.cpu_count(),
              "kernel": platform.release(), "bmap_s": bmap_s,
              "median_ratio": statistics.median(r["ratio"] for r in rows), "rows": rows}
    head = ["run", "image_gib", "data_gib", "ours_s", "ours_write_s", "ours_verify_s", "dd_s",
            "ratio", "ours_written_gib"]
    print_report(report, head, args.json)


if __name__ == "__main__":
    main()
