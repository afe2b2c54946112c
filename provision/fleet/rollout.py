"""`claw fleet rollout|rollback`: release a runtime image, or a model for the image the devices run,
to a fleet through playbooks/rollout.yml.

The controller checks everything first (the inventory, the image, the batch sizes and failure
budget), makes the image deliverable (a cached `claw image export` tarball, or a push to the
given registry), records the rollout, and runs the playbook through ansible-runner. Ansible
does the batching (`serial`) and stops at the failure budget (`max_fail_percentage`); each
device rolls itself back when its new version fails (the claw_release role). What Ansible
cannot do is undo the batch it stopped in: the controller then rolls that batch's switched
devices back to the versions they ran before (fleet_rollback.yml). Every step lands in the
history as the runner reports it.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from provision.ansible import new_run_dir, run_playbook
from provision.errors import BadInput
from provision.fleet import history
from provision.fleet.events import Tracker
from provision.fleet.plan import STRATEGIES, Settings, plan_batches
from provision.inventory import Inventory, load_inventory
from provision.paths import state_dir
from provision.provisioning import limit_hosts, run_inventory

MODEL_VERSION = re.compile(r".+\.gguf@[0-9a-f]{12}")
SWITCHED = ("installed", "healthy", "committed")
KEEP_TARBALLS = 3  # exported releases kept on the controller (a rollback may need the last)
IN_USE_S = 3600  # ... and any used this recently: another rollout may be delivering it still


def check_runtime_hosts(inventory: Inventory, hosts: list[str]) -> None:
    """Every targeted host must run the runtime as a container (the claw_runtime role)."""
    bad = []
    for name in hosts:
        s = inventory.hosts[name].settings
        if s is None or not s.claw_runtime_model or s.claw_runtime_install != "container":
            bad.append(name)
    if bad:
        raise BadInput(f"{inventory.path}: {', '.join(bad[:5])}{' …' if len(bad) > 5 else ''}: "
                       "no runtime service that runs images (expected claw_runtime_install: "
                       "container and claw_runtime_model set, then `claw provision --tags "
                       "docker_engine,claw_runtime`)")


def local_image_id(tag: str) -> str:
    import docker

    from images.base import docker_client

    if not tag or " " in tag:
        raise BadInput(f"--image {tag!r} is not valid (expected an image tag, e.g. "
                       "clawforge/runtime:0.1.0-rk3588-arm64)")
    try:
        return docker_client().images.get(tag).id
    except docker.errors.ImageNotFound:
        raise BadInput(f"--image {tag}: no such image on this machine (expected a tag from "
                       "`claw image build` or `docker images`)") from None


@dataclass
class ModelRelease:
    """A GGUF file to release: its version (file name@sha256 prefix) is what the history and the
    devices record, its versioned name what the device keeps it as beside the previous one."""

    path: Path
    sha256: str

    @property
    def version(self) -> str:
        return f"{self.path.name}@{self.sha256[:12]}"

    @property
    def device_file(self) -> str:
        return f"{self.path.stem}-{self.sha256[:12]}.gguf"

    def extravars(self) -> dict[str, str]:
        return {"claw_release_model_src": str(self.path.resolve()),
                "claw_release_model_file": self.device_file,
                "claw_release_model_sha256": self.sha256,
                "claw_release_model_version": self.version}


def model_release(path: Path) -> ModelRelease:
    """The model checked as the runtime opens it (header, metadata, architecture, tensor table)
    before anything runs, so a file that is not a servable GGUF never reaches a device."""
    from provision.fed.runs import file_sha256
    from runtime.errors import ModelError
    from runtime.model_file import open_model

    if not path.is_file():
        raise BadInput(f"--model {path}: no such file (expected a GGUF model file)")
    try:
        open_model(path)
    except ModelError as exc:
        raise BadInput(f"--model {exc}") from None
    return ModelRelease(path, file_sha256(path))


LAYERLESS = ".layerless.tar.zst"


def tarball_for(tag: str, image_id: str, progress: Callable[[str], None]) -> Path:
    """The image as a zstd tarball, exported once per image id and kept in the state dir, with
    its layerless copy beside it (`layerless_for`)."""
    from images.transfer import export_image, layerless_copy

    folder = state_dir() / "images"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{image_id.removeprefix('sha256:')[:16]}.tar.zst"
    if not path.is_file():
        progress(f"exporting {tag} to {path}")
        export_image(tag, path)
    if not layerless_for(path).is_file():
        layerless_copy(path, layerless_for(path))
    path.touch()  # newest use first: the cache keeps the last few releases, not all of them
    full = [p for p in folder.glob("*.tar.zst") if not p.name.endswith(LAYERLESS)]
    for old in sorted(full, key=lambda p: p.stat().st_mtime)[:-KEEP_TARBALLS]:
        if time.time() - old.stat().st_mtime < IN_USE_S:  # concurrent rollouts of 4 releases
            continue  # pruned a tarball under another one's batches ("Could not find")
        old.unlink(missing_ok=True)
        old.with_name(old.name + ".sha256").unlink(missing_ok=True)
        layerless_for(old).unlink(missing_ok=True)
    return path


def layerless_for(tarball: Path) -> Path:
    """The tarball's manifest and config alone: what a device that has the image's layers
    already (the same base as the release it runs) needs, a few KB instead of ~100 MB."""
    return tarball.with_name(tarball.name.removesuffix(".tar.zst") + LAYERLESS)


@dataclass
class RolloutResult:
    rollout_id: str
    status: str
    devices: list[dict[str, Any]] = field(default_factory=list)
    error: str = ""
    artifacts: str = ""


def select_hosts(inventory_path: Path, limit: str | None,
                 extravars: dict[str, Any] | None) -> tuple[Inventory, list[str]]:
    inventory = load_inventory(inventory_path, extra_vars=extravars)
    return inventory, limit_hosts(inventory, limit)


def _run(playbook: str, inventory: Inventory, hosts: list[str], extravars: dict[str, Any],
         tracker: Tracker, kind: str, run: tuple[str, Path] | None = None) -> Any:
    run_id, private = run or new_run_dir(kind)
    run_inv = run_inventory(inventory, private / "run-inventory.yml")
    stats: dict[str, Any] = {}

    def on_event(event: dict[str, Any]) -> None:
        if event.get("event") == "playbook_on_stats":
            stats.update(event.get("event_data", {}))
        tracker(event)

    result = run_playbook(playbook, run_inv, extravars=extravars, limit=",".join(hosts),
                          on_event=on_event, run=(run_id, private))
    tracker.finish_stats(stats)
    return result


def rollout(inventory_path: Path, image: str | None, settings: Settings, *,
            limit: str | None = None, extravars: dict[str, Any] | None = None,
            dry_run: bool = False, resume: str | None = None,
            progress: Callable[[str], None] = lambda _: None,
            on_change: Callable[[dict[str, dict[str, Any]]], None] | None = None,
            model: Path | None = None) -> RolloutResult | list[list[str]]:
    """Release `image`, or `model` for the image each device runs, to the inventory's devices
    in batches; the plan alone with dry_run."""
    if (image is None) == (model is None):
        raise BadInput("--image TAG and --model FILE.gguf are not valid together (expected one: "
                       "an image release, or a model release for the image the devices run)"
                       if image else "--image TAG or --model FILE.gguf is required")
    if settings.strategy not in STRATEGIES:
        raise BadInput(f"--strategy {settings.strategy!r} is not valid (expected one of: "
                       f"{', '.join(STRATEGIES)})")
    if settings.canary < 0:
        raise BadInput(f"--canary {settings.canary} is not valid (expected 0 or more devices)")
    inventory, hosts = select_hosts(inventory_path, limit, extravars)
    check_runtime_hosts(inventory, hosts)
    previous = history.get(resume) if resume else None
    if previous is not None:
        if previous["status"] not in ("interrupted", "halted", "failed"):
            raise BadInput(f"rollout {previous['id']} is {previous['status']} (expected an "
                           "interrupted, halted or failed rollout to resume)")
        done = {d["device"] for d in previous["devices"] if d["outcome"] in ("ok", "current")}
        hosts = [h for h in hosts if h not in done]
        if any(d["outcome"] == "ok" for d in previous["devices"]):
            settings.canary = 0  # its canary passed already
    if model is not None and settings.registry:
        raise BadInput(f"--registry {settings.registry}: a model release is copied to each "
                       "device (expected no --registry with --model)")
    release = model_release(model) if model is not None else None
    image_id = local_image_id(image) if release is None else f"sha256:{release.sha256}"
    name = image if release is None else release.version
    batches = plan_batches(hosts, settings.serial())
    if dry_run:
        return batches
    if not hosts:
        raise BadInput(f"{inventory_path}: no device left to roll out to")
    extra: dict[str, Any] = {
        **(release.extravars() if release else {"claw_release_image": image,
                                                 "claw_release_image_id": image_id}),
        "claw_release_delivery": settings.delivery, "claw_release_strategy": settings.strategy,
        "claw_release_health_timeout": settings.health_timeout,
        "claw_release_guard_s": settings.guard_s,
        "claw_rollout_serial": settings.serial(), "claw_rollout_max_fail": settings.max_fail,
    }
    if release is not None:
        pass  # the playbook copies the file itself
    elif settings.registry:
        from images.transfer import push_image

        progress(f"pushing {image} to {settings.registry}")
        push_image(image, settings.registry)
        extra["claw_release_registry"] = settings.registry
    else:
        tarball = tarball_for(image, image_id, progress)
        extra["claw_release_tarball"] = str(tarball)
        extra["claw_release_tarball_layerless"] = str(layerless_for(tarball))
    run_dir = new_run_dir("rollout")
    if previous is not None:
        rollout_id = previous["id"]
        history.resume(rollout_id, f"resumed at {time.strftime('%H:%M:%S')} on "
                                   f"{len(hosts)} device(s) (run {run_dir[0]}); ")
        offset = 1 + max((d["batch"] for d in previous["devices"]
                          if d["outcome"] in ("ok", "current")), default=-1)
    else:
        rollout_id = run_dir[0]
        history.start(rollout_id, "rollout", inventory_path, name, image_id,
                      {**settings.__dict__, "delivery": "copy" if release else settings.delivery,
                       "limit": limit or "", "model": str(model.resolve()) if model else ""},
                      batches)
        offset = 0
    extra["claw_release_rollout"] = rollout_id
    tracker = Tracker(rollout_id, on_change, batch_offset=offset)
    try:
        run = _run("rollout.yml", inventory, hosts, {**(extravars or {}), **extra}, tracker,
                   "rollout", run_dir)
    except BaseException:
        history.finish(rollout_id, "interrupted", "the controller stopped (interrupted)",
                       _stopped(rollout_id))
        raise
    return _conclude(rollout_id, inventory, tracker, run, extravars, progress)


def _stopped(rollout_id: str) -> str:
    return history.where_stopped(history.get(rollout_id)["devices"])


def _conclude(rollout_id: str, inventory: Inventory, tracker: Tracker, run: Any,
              extravars: dict[str, Any] | None, progress: Callable[[str], None]) -> RolloutResult:
    """Settle the outcome: undo the batch the budget stopped, mark untouched devices."""
    devices = history.get(rollout_id)["devices"]
    stopped_at, error = "", ""
    if tracker.halted:
        status = "halted"
        failed_batch = tracker.batch
        in_batch = [d for d in devices if d["batch"] == failed_batch]
        failed = [d["device"] for d in in_batch if d["outcome"] in ("failed", "rolled_back",
                                                                     "unreachable")]
        stopped_at = (f"batch {failed_batch}: {len(failed)} of {len(in_batch)} failed "
                      f"({', '.join(failed)})")
        undo = {d["device"]: d["from_image"] for d in devices if d["batch"] == failed_batch
                and d["phase"] in SWITCHED and d["outcome"] in ("pending", "ok")
                and (d["from_image"] or d["outcome"] == "pending")}
        error = "the failure budget was exceeded"
        if undo:
            progress(f"rolling back batch {failed_batch}: {', '.join(sorted(undo))}")
            # an uncommitted switch goes back to the committed release ("")
            outcome = {d["device"]: d["outcome"] for d in devices}
            targets = {h: "" if outcome[h] == "pending" else img for h, img in undo.items()}
            rb = Tracker(rollout_id, tracker.on_change, batch_offset=failed_batch)
            _run("fleet_rollback.yml", inventory, sorted(undo),
                 {**(extravars or {}), "claw_release_targets": targets,
                  "claw_release_rollout": rollout_id}, rb, "rollback")
            for host in undo:
                row = rb.devices.get(host, {})
                ok = row.get("rollback_healthy") or not row.get("to")
                history.device_update(rollout_id, host, outcome="rolled_back" if ok else "failed",
                                      ended=time.time(), error="batch rolled back: " + error)
        for d in devices:
            if d["outcome"] == "pending" and d["device"] not in undo:
                history.device_update(rollout_id, d["device"], outcome="skipped",
                                      phase=d["phase"], error="not started: " + error
                                      if d["phase"] == "waiting" else "stopped: " + error)
    else:
        for d in devices:
            if d["outcome"] == "pending":
                history.device_update(rollout_id, d["device"], outcome="failed",
                                      error="no result from the playbook (rc "
                                            f"{run.rc}, {run.status})")
        devices = history.get(rollout_id)["devices"]
        bad = [d for d in devices if d["outcome"] not in ("ok", "current")]
        status = "succeeded" if not bad else "failed"
        if bad:
            error = f"{len(bad)} of {len(devices)} device(s) did not take the release"
    history.finish(rollout_id, status, error, stopped_at)
    return RolloutResult(rollout_id, status, history.get(rollout_id)["devices"], error,
                         str(run.artifacts))


def rollback(inventory_path: Path, *, to: str | None = None, rollout_id: str | None = None,
             limit: str | None = None, extravars: dict[str, Any] | None = None,
             on_change: Callable[[dict[str, dict[str, Any]]], None] | None = None
             ) -> RolloutResult:
    """Devices back to `to`, to what they ran before rollout `rollout_id` (only the devices
    it changed), or else each to its own previous release."""
    inventory, hosts = select_hosts(inventory_path, limit, extravars)
    check_runtime_hosts(inventory, hosts)
    source = None
    image_id = ""
    if to:
        # a model version (name.gguf@sha256 prefix) is looked up among the device's kept models
        image_id = "" if MODEL_VERSION.fullmatch(to) else local_image_id(to)
        targets = dict.fromkeys(hosts, to)
    elif rollout_id:
        source = history.get(rollout_id)
        touched = {d["device"]: d for d in source["devices"]
                   if d["phase"] in SWITCHED or d["outcome"] == "ok"}
        # back to what each ran before it; a device it reached first ran nothing: leave it
        targets = {h: touched[h]["from_image"] for h in hosts
                   if h in touched and touched[h]["from_image"]}
        if not targets:
            raise BadInput(f"rollout {source['id']} changed no device of {inventory_path} "
                           "that ran an earlier version: nothing to roll back")
    else:
        targets = dict.fromkeys(hosts, "@previous")
    run_dir = new_run_dir("rollback")
    rollback_id = run_dir[0]
    target_list = sorted(targets)
    what = to or (f"before {source['id']}" if source else "previous")
    history.start(rollback_id, "rollback", inventory_path, what, image_id,
                  {"to": to or "", "rollout": source["id"] if source else ""}, [target_list])
    tracker = Tracker(rollback_id, on_change)
    run = _run("fleet_rollback.yml", inventory, target_list,
               {**(extravars or {}), "claw_release_targets": targets,
                "claw_release_rollout": rollback_id}, tracker, "rollback", run_dir)
    for host in target_list:
        row = tracker.devices.get(host, {})
        if row.get("outcome") in ("unreachable", "failed", "rolled_back"):
            continue
        healthy = row.get("rollback_healthy") or not targets[host]
        history.device_update(rollback_id, host, to_image=row.get("to") or targets[host],
                              outcome="ok" if row.get("phase") == "rolled_back" and healthy
                              else "failed", ended=time.time())
    devices = history.get(rollback_id)["devices"]
    bad = [d for d in devices if d["outcome"] != "ok"]
    status = "succeeded" if not bad else "failed"
    error = f"{len(bad)} of {len(devices)} device(s) not rolled back" if bad else ""
    history.finish(rollback_id, status, error)
    return RolloutResult(rollback_id, status, history.get(rollback_id)["devices"], error,
                         str(run.artifacts))

