"""Ray plumbing shared by `sweep --ray` and `bench --ray`: connecting to a cluster, and shipping
files (the model, calibration windows, statistics) to the nodes once.

Ray is an optional extra (`pip install 'onnxprune[ray]'`) and is imported only here, lazily.

Shipping. A file set (a model with its external data, or one .npz) of up to SHIP_LIMIT_BYTES is
put into Ray's object store once by the driver; on each node, the first task that needs it writes
it into a node-local cache folder named after the content hash, and every later task on that node
reads the cached copy (a re-run with the same model transfers nothing). Larger file sets, or every
file with `--shared-storage`, are not copied: the nodes read the driver's path, which must then be
on storage that every node mounts at the same path (NFS, a cluster file system).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import socket
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from onnxprune.errors import UserError, first_line
from onnxprune.extras import require
from onnxprune.model_io import external_files_of
from onnxprune.progress import progress_bar

SHIP_LIMIT_BYTES = 1 << 30  # past this, a path on shared storage instead of the object store
CACHE_ROOT = Path(tempfile.gettempdir()) / "onnxprune-ray-cache"


@dataclass(frozen=True)
class ClusterOptions:
    address: str = "auto"  # 'auto': the cluster `ray start` runs on this machine (or RAY_ADDRESS), else a new local one
    cell_cpus: float = 1.0  # resources each task reserves
    cell_gpus: float = 0.0
    max_retries: int = 2  # re-runs of a task whose worker process or node died
    shared_storage: bool = False  # nodes read the driver's paths instead of copies from the object store


def require_ray():
    return require("ray", "--ray")


@contextmanager
def ray_session(address: str):
    """Ray, connected to `address`; a cluster started here is shut down on exit, one that was
    already running (or a ray.init() made by the caller) is left as it was."""
    ray = require_ray()
    if ray.is_initialized():
        yield ray
        return
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    try:
        # Workers' stdout is not forwarded: a task's failure comes back as its record's reason.
        ray.init(address=None if address == "auto" else address, include_dashboard=False, log_to_driver=False,
                 logging_level="WARNING")
    except (ConnectionError, ValueError, RuntimeError) as exc:
        raise UserError(f"cannot connect to the Ray cluster at {address!r}: {first_line(exc)} (start one with "
                        "`ray start --head`, or pass --ray auto for a local one)") from None
    try:
        yield ray
    finally:
        ray.shutdown()


def check_feasible(ray, cpus: float, gpus: float) -> None:
    """A task no node can hold would wait forever: refuse it up front."""
    nodes = [n["Resources"] for n in ray.nodes() if n["Alive"]]
    if not any(r.get("CPU", 0) >= cpus and r.get("GPU", 0) >= gpus for r in nodes):
        have = "; ".join(f"{r.get('CPU', 0):g} CPU, {r.get('GPU', 0):g} GPU" for r in nodes)
        raise UserError(f"no Ray node has {cpus:g} CPU and {gpus:g} GPU for one cell (nodes: {have}); "
                        "lower --cell-cpus / --cell-gpus")


@dataclass(frozen=True)
class Shipped:
    """A file set the nodes can materialise: through the object store (`ref`) or a shared `path`."""

    name: str  # the main file's name
    key: str  # content hash: the node cache folder
    ref: object | None = None  # ObjectRef of {file name: bytes}
    path: str | None = None


def ship(ray, path: str | os.PathLike, shared_storage: bool = False) -> Shipped:
    """`path` (with the external data files an .onnx refers to) made available to every node."""
    path = Path(path).resolve()
    external = sorted(external_files_of(path)) if path.suffix == ".onnx" else []
    files = [path] + [path.parent / name for name in external]
    if shared_storage or sum(f.stat().st_size for f in files) > SHIP_LIMIT_BYTES:
        return Shipped(path.name, "", path=str(path))
    contents = {f.name: f.read_bytes() for f in files}
    digest = hashlib.sha256()
    for name, data in contents.items():
        digest.update(name.encode() + b"\0" + hashlib.sha256(data).digest())
    return Shipped(path.name, digest.hexdigest()[:24], ref=ray.put(contents))


def materialise(shipped: Shipped) -> Path:
    """On the node running this: the local path of a shipped file set (copied once per node)."""
    if shipped.path is not None:
        path = Path(shipped.path)
        if not path.is_file():
            raise UserError(f"{path} is not visible on node {socket.gethostname()}: put it on storage every node "
                            "mounts at the same path")
        return path
    folder = CACHE_ROOT / shipped.key
    if not (folder / shipped.name).is_file():
        import ray

        CACHE_ROOT.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{shipped.key}.", dir=CACHE_ROOT))
        try:
            for name, data in ray.get(shipped.ref).items():
                (staging / name).write_bytes(data)
            os.rename(staging, folder)  # atomic: a task beside this one sees the whole set or none
        except OSError:
            if not (folder / shipped.name).is_file():  # not a neighbour's rename that won the race
                raise
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return folder / shipped.name


def scratch_dir() -> Path:
    """A node-local folder for a task's temporary outputs."""
    CACHE_ROOT.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix="task-", dir=CACHE_ROOT))


def finished(ray, pending: dict, description: str, max_retries: int) -> Iterator[tuple[object, object, str | None]]:
    """(what each task was submitted for, its result, None) as tasks finish, counted by a progress
    bar; (…, None, the reason) for a task that did not return."""
    pending = dict(pending)
    for _ in progress_bar(range(len(pending)), description):
        [ref], _ = ray.wait(list(pending), num_returns=1)
        key = pending.pop(ref)
        try:
            result, reason = ray.get(ref), None
        except Exception as exc:  # the worker or node was lost past the retries, or the task raised
            result, reason = None, failure_reason(exc, max_retries)
        yield key, result, reason


def failure_reason(exc: BaseException, max_retries: int) -> str:
    """One line for a task that did not return: its own exception, or the lost worker / node."""
    ray = require_ray()
    if isinstance(exc, ray.exceptions.RayTaskError) and exc.cause is not None:
        cause = exc.cause
        return str(cause) if isinstance(cause, UserError) else f"{type(cause).__name__}: {first_line(cause)}"
    return f"{type(exc).__name__} after {max_retries} retries: {first_line(exc)}"
