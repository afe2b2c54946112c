"""`claw flash` (write an image to a disk, verified) and `claw bmap` (make an image's block map)."""

from __future__ import annotations

from pathlib import Path

import typer

from provision.interrupts import sigterm_as_interrupt
from provision.output import console, err_console, print_json


def flash_cmd(
    image: Path = typer.Argument(..., help="Disk image: raw, .zst, .xz or .gz."),
    target: Path = typer.Argument(..., help="Block device (e.g. /dev/sdb), or a file with "
                                  "--target-file."),
    bmap: Path | None = typer.Option(None, "--bmap", help="Block map (default: IMAGE.bmap "
                                     "beside the image, else SEEK_DATA/SEEK_HOLE on a raw one)."),
    target_file: bool = typer.Option(False, "--target-file", help="TARGET is a regular file "
                                     "(created if missing)."),
    no_verify: bool = typer.Option(False, "--no-verify", help="Skip the read-back check."),
    max_rate: float | None = typer.Option(None, "--max-rate", min=0.1, help="Write at most "
                                          "this many MB/s (spare a shared USB hub)."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON."),
) -> None:
    """Write an OS image to an SD card or disk: only the ranges holding data, then read every
    written range back and compare its SHA-256.

    Refuses (exit 2, nothing written) a mounted or in-use device, the disk holding /, a
    non-block target without --target-file, a target smaller than the image, a block map passed
    as the image, and a map that is not the image's or a damaged image (every mapped range's
    SHA-256 is checked before the first write). Ctrl-C leaves the target incomplete (exit 1).

    Example: [bold]claw flash rpi5.img.zst /dev/sdb[/bold]
    """
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    from provision.flash import flash

    bars = Progress(TextColumn("{task.description:<7}"), BarColumn(), DownloadColumn(),
                    TransferSpeedColumn(), TimeRemainingColumn(), console=err_console,
                    transient=as_json)
    tasks: dict[str, int] = {}

    def progress(phase: str, done: int, total: int) -> None:
        if phase not in tasks:
            tasks[phase] = bars.add_task(phase, total=total)
        bars.update(tasks[phase], completed=done)

    with sigterm_as_interrupt(), bars:  # SIGTERM ends a flash the same clear way Ctrl-C does
        try:
            result = flash(image, target, target_file=target_file, bmap_path=bmap,
                           verify=not no_verify, progress=progress,
                           max_rate=max_rate * 1e6 if max_rate else None)
        except BaseException:
            for task in tasks.values():  # a refusal or failure is its one error line, no bars
                bars.remove_task(task)
            raise
    record = vars(result) | {"verified": not no_verify}
    if as_json:
        print_json(record)
        return
    mb = result.written_bytes / 1e6
    console.print(f"wrote {mb:.0f} MB of {result.image_size / 1e6:.0f} MB "
                  f"({result.ranges} ranges, map: {result.map_source}) to {target} in "
                  f"{result.write_s:.1f} s ({mb / max(result.write_s, 1e-9):.0f} MB/s)"
                  + (f"; verified in {result.verify_s:.1f} s" if not no_verify else
                     "; not verified"), highlight=False)


def bmap_cmd(
    image: Path = typer.Argument(..., help="Raw disk image (written sparse)."),
    compress: str | None = typer.Option(None, "--compress", help="Also write IMAGE.zst or "
                                        "IMAGE.xz (zst or xz); the map stays the raw image's."),
    as_json: bool = typer.Option(False, "--json", help="Print the map's summary as JSON."),
) -> None:
    """Write IMAGE.bmap: the ranges holding data (SEEK_DATA/SEEK_HOLE), their SHA-256 and the
    whole image's, so `claw flash` writes and verifies only those.

    Example: [bold]claw bmap out/rpi5.img --compress zst[/bold]
    """
    from provision.blockmap import map_image
    from provision.errors import BadInput
    from provision.flash import compression_of

    if compression_of(image) != "raw":
        raise BadInput(f"{image}: is compressed; map the raw image (the map describes it)")
    bmap, bmap_path, out = map_image(image, compress)
    record = {"image": str(image), "bmap": str(bmap_path), "flash": str(out),
              "image_size": bmap.image_size, "mapped_bytes": bmap.mapped_bytes,
              "ranges": len(bmap.ranges), "image_sha256": bmap.image_sha256}
    if as_json:
        print_json(record)
        return
    console.print(f"{bmap_path}: {bmap.mapped_bytes / 1e6:.1f} MB of {bmap.image_size / 1e6:.1f}"
                  f" MB in {len(bmap.ranges)} ranges; flash {out}", highlight=False)
