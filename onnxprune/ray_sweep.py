"""`sweep --ray`: the sweep's cells as Ray tasks, one per cell, each with its own resource request.

The driver (this process) prepares what every cell shares, as the sequential sweep does
(sweeps.shared_calibration): the calibration windows, and with --one-shot the dense statistics,
computed once by one task and then shipped to every cell. The model, windows and statistics go
to the nodes once (distributed.ship). Each task runs sweeps.run_cell, the sequential sweep's own
cell function, and returns its record; only the driver appends records to results.jsonl, in the
order cells finish, so resume, the tables and the plot are the sequential sweep's.

A task whose worker process or node dies is re-run by Ray up to `max_retries` times; after that,
the cell is recorded as failed with the reason, and the sweep goes on.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import numpy as np

from onnxprune import console
from onnxprune.atomic import atomic_path
from onnxprune.distributed import (ClusterOptions, Shipped, check_feasible, failure_reason, finished, materialise,
                                   ray_session, require_ray, scratch_dir, ship)
from onnxprune.errors import UserError
from onnxprune.sweeps import (CellRunner, SweepConfig, append_result, cell_record, one_shot_statistics, run_cell,
                             shared_calibration)

# Test hook: "METHOD/LABEL" makes the first attempt of that cell kill its worker process, as a
# crash or an out-of-memory kill would (a marker file in OUT says it already happened).
CRASH_ONCE_ENV = "ONNXPRUNE_TEST_CRASH_ONCE"


def ray_runner(cluster: ClusterOptions) -> CellRunner:
    """`run_sweep`'s cells as tasks on the Ray `cluster`; refuses here, before any work, if Ray is missing."""
    require_ray()
    return lambda *cells: run_cells_on_ray(*cells, cluster)


def run_cells_on_ray(model_path: Path, config: SweepConfig, todo: list[tuple[str, str]], tokenizer,
                     eval_ids: np.ndarray, results_path: Path, cluster: ClusterOptions) -> None:
    with ray_session(cluster.address) as ray:
        check_feasible(ray, cluster.cell_cpus, cluster.cell_gpus)
        resources = {"num_cpus": cluster.cell_cpus, "num_gpus": cluster.cell_gpus, "max_retries": cluster.max_retries}
        model = ship(ray, model_path, cluster.shared_storage)

        def statistics_on_ray(calib_file: Path, stats_file: Path) -> dict:
            task = ray.remote(_statistics_task).options(**resources)
            try:
                summary, data = ray.get(task.remote(model, ship(ray, calib_file, cluster.shared_storage), config))
            except Exception as exc:  # no cell can run without them
                reason = failure_reason(exc, cluster.max_retries)
                raise UserError(f"the one-shot statistics task failed: {reason}") from None
            with atomic_path(stats_file) as staging:
                staging.write_bytes(data)
            return summary

        shared = shared_calibration(model_path, config, todo, results_path, statistics_on_ray)
        shipped = {key: ship(ray, path, cluster.shared_storage) for key, path in shared.items()}
        context = ray.put((tokenizer, eval_ids))
        crash_cell = os.environ.get(CRASH_ONCE_ENV)
        task = ray.remote(_cell_task).options(**resources)
        pending = {task.remote(model, context, config, shipped, method, label, crash_cell == f"{method}/{label}"):
                   (method, label) for method, label in todo}
        cells = finished(ray, pending, "sweep cells (ray)", cluster.max_retries)
        for count, ((method, label), record, reason) in enumerate(cells, 1):
            if reason is not None:
                record = cell_record(method, label) | {"status": "error", "error": reason}
            append_result(results_path, record)
            if not sys.stderr.isatty() and not console.is_quiet():  # logs: a line per cell; terminals: the bar
                print(f"sweep: {count}/{len(pending)} {method} {label}: {record['status']}"
                      + (f" on {record['node']}" if "node" in record else ""), file=sys.stderr)


def _statistics_task(model: Shipped, calib: Shipped, config: SweepConfig) -> tuple[dict, bytes]:
    scratch = scratch_dir()
    try:
        stats_file = scratch / "statistics.npz"
        summary = one_shot_statistics(materialise(model), materialise(calib), stats_file, config)
        return summary, stats_file.read_bytes()
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _cell_task(model: Shipped, context, config: SweepConfig, shipped: dict[str, Shipped], method: str, label: str,
               crash_once: bool) -> dict:
    import socket

    tokenizer, eval_ids = context
    scratch = scratch_dir()
    try:
        if crash_once:
            marker = config.out_dir / f".crashed-{method}-{label.replace(':', 'of')}"
            if not marker.exists():
                marker.touch()
                os._exit(1)
        shared = {key: str(materialise(value)) for key, value in shipped.items()}
        # Pruned models go to the node's scratch folder, or with --keep-models to OUT/models (on a
        # multi-node cluster, OUT must then be on shared storage to collect them).
        shared["models"] = str(config.out_dir / "models" if config.keep_models else scratch)
        record = run_cell(materialise(model), config, method, label, tokenizer, eval_ids, shared)
        return record | {"node": socket.gethostname()}
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
