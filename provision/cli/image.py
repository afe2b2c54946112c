"""`claw image`: runtime and dev-env container images per device profile, with no registry."""

from __future__ import annotations

import sys
from pathlib import Path

import typer
from rich.markup import escape

from provision.output import console, err_console, print_json

app = typer.Typer(help="Render, build, smoke-test, export and deploy runtime and dev-env "
                  "container images per device profile.", no_args_is_help=True)

KIND_HELP = "runtime (the inference server) or dev-env (toolchain for device developers)."
PROFILE_HELP = "Device profile (see `claw profiles list`)."
ARCH_HELP = "amd64 or arm64 (default: the profile's)."
OPENCL_HELP = ("OpenCL stack from the profile (default: its first), or none (any profile, "
               "runtime image only; not a stack of the profile): no OpenCL at all, the runtime "
               "runs on numpy, a much smaller image.")
TEMPLATES_HELP = "A directory of your own templates (default: the shipped ones)."


EXTRA_HELP = ("An extra of the wheel to install beside the runtime (repeatable; fed: Flower, "
              "PyTorch CPU and peft for `claw fed run`); the tag gets -EXTRA after it.")


def _target(kind: str, profile: str, arch: str | None, opencl: str | None,
            extras: list[str] | None = None):
    from images.render import resolve

    return resolve(kind, profile, arch, opencl, tuple(extras or ()))


@app.command("render")
def render_cmd(
    kind: str = typer.Argument(..., help=KIND_HELP),
    profile: str = typer.Option(..., "--profile", "-p", help=PROFILE_HELP),
    arch: str | None = typer.Option(None, "--arch", help=ARCH_HELP),
    opencl: str | None = typer.Option(None, "--opencl", help=OPENCL_HELP),
    extra: list[str] | None = typer.Option(None, "--extra", help=EXTRA_HELP),
    output: Path | None = typer.Option(None, "-o", "--output", help="Write it here."),
    templates: Path | None = typer.Option(None, "--templates", help=TEMPLATES_HELP),
    lint: bool = typer.Option(False, "--lint", help="Check it with hadolint (errors fail)."),
) -> None:
    """Print (or write) the Dockerfile of an image kind for a profile and architecture.

    Example: [bold]claw image render runtime --profile rk3588 --lint[/bold]
    """
    from images.render import lint as hadolint
    from images.render import render
    from provision.errors import ClawError

    text = render(_target(kind, profile, arch, opencl, extra), templates)
    if lint:
        findings = hadolint(text)
        for f in findings:
            err_console.print(f"hadolint {f['level']} {f['code']} line {f['line']}: "
                              f"{escape(f['message'])}", highlight=False)
        errors = [f for f in findings if f["level"] == "error"]
        if errors:
            raise ClawError(f"hadolint found {len(errors)} error(s) in the {kind} Dockerfile")
    emit(text, output)


class _BuildDisplay:
    """A rich progress bar over the build's steps, one line per finished step."""

    def __init__(self, kind: str, quiet: bool):
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            SpinnerColumn,
            TextColumn,
            TimeElapsedColumn,
        )

        self.quiet = quiet
        self.progress = Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(),
                                 MofNCompleteColumn(), TimeElapsedColumn(), console=err_console,
                                 transient=True, disable=quiet)
        self.task = self.progress.add_task(f"{kind}: starting", total=None)

    def step(self, step) -> None:
        self.progress.update(self.task, total=step.total, completed=step.number - 1,
                             description=f"step {step.number}/{step.total} "
                             f"{escape(step.instruction[:60])}")

    def line(self, line: str) -> None:
        self.progress.update(self.task, description=self.progress.tasks[0].description.split(
            " · ")[0] + f" · [dim]{escape(line[:50])}[/]")

    def done(self, step) -> None:
        self.progress.update(self.task, completed=step.number)
        if not self.quiet:
            how = "[dim]cached[/]" if step.cached else f"{step.seconds:6.1f} s"
            layer = f" → {step.layer}" if step.layer else ""
            self.progress.console.print(f"  {step.number:>2}/{step.total} {how:>8}  "
                                        f"{escape(step.instruction)}{layer}",
                                        highlight=False, no_wrap=True, overflow="ellipsis")


@app.command("build")
def build_cmd(
    kind: str = typer.Argument(..., help=KIND_HELP),
    profile: str = typer.Option(..., "--profile", "-p", help=PROFILE_HELP),
    arch: str | None = typer.Option(None, "--arch", help=ARCH_HELP),
    opencl: str | None = typer.Option(None, "--opencl", help=OPENCL_HELP),
    extra: list[str] | None = typer.Option(None, "--extra", help=EXTRA_HELP),
    tag: str | None = typer.Option(None, "--tag", "-t",
                                   help=("Image tag (default clawforge/KIND:VERSION-PROFILE-ARCH, "
                                         "with -numpy after it for --opencl none, then "
                                         "-EXTRA for each --extra).")),
    no_cache: bool = typer.Option(False, "--no-cache", help="Rebuild every layer."),
    no_smoke: bool = typer.Option(False, "--no-smoke-test",
                                  help="Tag without running the self-test inside the image."),
    templates: Path | None = typer.Option(None, "--templates", help=TEMPLATES_HELP),
    json_out: bool = typer.Option(False, "--json", help="Print the result as JSON."),
) -> None:
    """Build an image through the Docker SDK from the offline base, run the runtime's
    self-test inside it, and tag it only when that passed.

    Example: [bold]claw image build runtime --profile rpi5 --arch arm64[/bold]
    """
    from images.build import BuildFailed, BuildLog, build_image

    target = _target(kind, profile, arch, opencl, extra)
    display = _BuildDisplay(kind, quiet=json_out)
    log = BuildLog(on_step=display.step, on_step_done=display.done, on_line=display.line)

    def note(message: str) -> None:
        if not json_out:
            display.progress.console.print(f"[dim]{escape(message)}[/]", highlight=False)

    try:
        with display.progress:
            result = build_image(target, tag=tag, no_cache=no_cache, template_dir=templates,
                                 smoke=not no_smoke, log=log, progress=note)
    except BuildFailed as exc:
        for line in exc.tail:
            err_console.print(f"  [dim]|[/] {escape(line)}", highlight=False, soft_wrap=True)
        raise
    if json_out:
        print_json(result.record())
        return
    checks = (result.smoke or {}).get("checks", [])
    opencl_check = next((c for c in checks if c["name"] == "opencl"), None)
    console.print(f"built [bold]{result.tag}[/] ({result.image_id[7:19]}) in "
                  f"{result.seconds:.1f} s: {len(result.steps)} steps, {result.cached_steps} "
                  f"cached, {result.size_bytes / 2**20:,.0f} MiB", highlight=False)
    if result.smoke:
        if opencl_check and opencl_check.get("skipped"):
            opencl_line = f"OpenCL skipped ({opencl_check['skipped']})"
        else:
            opencl_line = f"OpenCL on {opencl_check['detail']['device'] if opencl_check else '-'}"
        console.print(f"smoke test passed: model generated, {escape(opencl_line)}",
                      highlight=False)


@app.command("base")
def base_cmd(
    arch: str = typer.Option("amd64", "--arch", help="amd64 or arm64."),
) -> None:
    """Make the offline Debian base image the templates build FROM (debootstrap + docker
    import), or find it cached by its inputs.

    Example: [bold]claw image base --arch arm64[/bold]
    """
    from images.base import ensure_image_base

    tag = ensure_image_base(arch, progress=lambda m: console.print(f"[dim]{escape(m)}[/]"))
    console.print(tag)


@app.command("export")
def export_cmd(
    tag: str = typer.Argument(..., help="A local image."),
    output: Path = typer.Option(..., "-o", "--output", help="FILE.tar.zst (or FILE.tar)."),
    json_out: bool = typer.Option(False, "--json", help="Print the result as JSON."),
) -> None:
    """Save an image as a zstd tarball with a sha256 beside it, for fleets with no registry.

    Example: [bold]claw image export clawforge/runtime:0.1.0-rpi5-arm64 -o rt.tar.zst[/bold]
    """
    from rich.progress import BarColumn, DownloadColumn, Progress, TransferSpeedColumn

    from images.transfer import export_image

    bar = Progress("export", BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                   console=err_console, transient=True, disable=json_out)
    task = bar.add_task("export", total=None)
    with bar:
        result = export_image(tag, output, progress=lambda n: bar.update(task, completed=n))
    if json_out:
        print_json(result)
    else:
        console.print(f"wrote {output} ({result['file_bytes'] / 2**20:,.1f} MiB from "
                      f"{result['image_bytes'] / 2**20:,.1f} MiB), sha256 {result['sha256']}",
                      highlight=False)


@app.command("import")
def import_cmd(
    file: Path = typer.Argument(..., help="A tarball written by `claw image export`."),
    no_verify: bool = typer.Option(False, "--no-verify", help="Skip the sha256 check."),
) -> None:
    """Load an exported image after checking its sha256.

    Example: [bold]claw image import rt.tar.zst[/bold]
    """
    from images.transfer import import_image

    for ref in import_image(file, check=not no_verify):
        console.print(f"loaded {ref}", highlight=False)


@app.command("push")
def push_cmd(
    tag: str = typer.Argument(..., help="A local image."),
    registry: str = typer.Option(..., "--registry", help="host[:port] of the registry."),
) -> None:
    """Push an image to a registry (when the fleet has one).

    Example: [bold]claw image push clawforge/runtime:0.1.0-rk3588-arm64 --registry reg:5000[/bold]
    """
    from images.transfer import push_image

    console.print(f"pushed {push_image(tag, registry)}", highlight=False)


@app.command("run-dev")
def run_dev_cmd(
    profile: str = typer.Option(..., "--profile", "-p", help=PROFILE_HELP),
    arch: str | None = typer.Option(None, "--arch", help=ARCH_HELP),
    image: str | None = typer.Option(None, "--image", help="Image (default: the built dev-env)."),
    workspace: Path = typer.Option(Path("."), "--workspace", "-w",
                                   help="Directory mounted at /workspace."),
    privileged: bool = typer.Option(False, "--privileged",
                                    help="Every device instead of the precise ones."),
    name: str | None = typer.Option(None, "--name", help="Container name."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Only print the docker run line."),
) -> None:
    """Start the dev-env container with the board's devices (/dev/dri, /dev/mali0,
    /dev/bus/usb), host network and the workspace mounted; print the equivalent `docker run`.

    Example: [bold]claw image run-dev --profile rk3588 -w ~/src/app[/bold]
    """
    from images.devenv import dev_run_spec, start_dev

    spec = dev_run_spec(profile, arch, image, workspace, privileged, name)
    console.print(spec.command_line(), highlight=False, soft_wrap=True)
    if not dry_run:
        container = start_dev(spec)
        console.print(f"started {container}; enter it with [bold]docker exec -it {container} "
                      "bash[/bold]", highlight=False)


@app.command("k8s")
def k8s_cmd(
    profile: str = typer.Option(..., "--profile", "-p", help=PROFILE_HELP),
    image: str | None = typer.Option(None, "--image", help="Image (default: the built runtime)."),
    model: str = typer.Option("/var/lib/clawforge/models/model.gguf", "--model",
                              help="Model path on the node."),
    namespace: str = typer.Option("clawforge", "--namespace", "-n"),
    output: Path | None = typer.Option(None, "-o", "--output", help="Write it here."),
) -> None:
    """Kubernetes manifests for the runtime on a profile's nodes: a DaemonSet, its Service and
    ConfigMap, with resource limits and health probes from the profile.

    Example: [bold]claw image k8s --profile rk3588 | kubectl apply -f -[/bold]
    """
    from images.k8s import render_manifests

    text = render_manifests(profile, image=image, model=model, namespace=namespace)
    emit(text, output)


def emit(text: str, output: Path | None) -> None:
    """Print `text`, or write it to `output` whole (a temp file renamed: never half-written)."""
    if output:
        part = output.with_name(f".{output.name}.part")
        part.write_text(text)
        part.replace(output)
        err_console.print(f"wrote {output}")
    else:
        sys.stdout.write(text)
