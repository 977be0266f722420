"""`bench --ray`: the same latency benchmark (latency.run_bench) on every node of a Ray cluster, or
on the nodes that have every resource named by --nodes (GPU, or a custom one such as `trt` given
to `ray start --resources`), each reporting its hardware.

One task per node, pinned to it and reserving all of its CPUs and GPUs, so nothing else Ray
schedules runs beside the measurement. Each node measures the model against the baseline on
itself: speed-ups compare two models on one machine, never two machines.
"""

from __future__ import annotations

import os
import platform
import shutil
import socket
import subprocess
from dataclasses import replace
from pathlib import Path

from onnxprune.distributed import ClusterOptions, Shipped, finished, materialise, ray_session, ship
from onnxprune.errors import UserError
from onnxprune.runtime_bench.latency import MODEL, BASELINE, BenchOptions, model_labels, run_bench

_RAY_BOOKKEEPING = ("memory", "object_store_memory", "node:")  # resources every node has: not labels


def bench_on_ray(model: Path, baseline: Path | None, options: BenchOptions, cluster: ClusterOptions,
                 node_resources: list[str], gemm24: bool = False) -> dict:
    """{"nodes": [{node, node_id, address, resources, hardware, bench | error}], ...}, in node order."""
    paths = {MODEL: model} | ({BASELINE: baseline} if baseline is not None else {})
    with ray_session(cluster.address) as ray:
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        nodes = matching_nodes(ray.nodes(), node_resources)
        shipped = {role: ship(ray, path, cluster.shared_storage) for role, path in paths.items()}
        if options.inputs is not None:
            options = replace(options, inputs=ship(ray, options.inputs, cluster.shared_storage))
        task = ray.remote(_bench_task)
        refs = {task.options(num_cpus=node["Resources"].get("CPU", 0), num_gpus=node["Resources"].get("GPU", 0),
                             max_retries=cluster.max_retries,
                             scheduling_strategy=NodeAffinitySchedulingStrategy(node["NodeID"], soft=False))
                .remote(shipped, options, gemm24): node for node in nodes}
        found = {}
        for node, measured, reason in finished(ray, refs, "bench nodes (ray)", cluster.max_retries):
            found[node["NodeID"]] = {"node_id": node["NodeID"], "address": node["NodeManagerAddress"],
                                     "resources": _labels(node["Resources"]), **(measured or {"error": reason})}
    entries = [found[node["NodeID"]] for node in nodes]
    names = [e.get("hardware", {}).get("host") or e["address"] for e in entries]
    for entry, name in zip(entries, names):  # hosts can repeat (containers): the node id tells them apart
        entry["node"] = name if names.count(name) == 1 else f"{name} ({entry['node_id'][:8]})"
    if not any("bench" in e for e in entries):
        raise UserError("no node could measure: " + "; ".join(f"{e['node']}: {e['error']}" for e in entries))
    return {"models": {role: str(path) for role, path in paths.items()}, "labels": model_labels(paths),
            "node_resources": node_resources, "nodes": entries}


def matching_nodes(nodes: list[dict], required: list[str]) -> list[dict]:
    """The live nodes that have every `required` resource (e.g. GPU, trt)."""
    alive = [n for n in nodes if n["Alive"]]
    chosen = [n for n in alive if all(n["Resources"].get(r, 0) > 0 for r in required)]
    if not chosen:
        have = sorted({r for n in alive for r in _labels(n["Resources"])})
        raise UserError(f"no Ray node has the resources {', '.join(required)} (the nodes have: {', '.join(have)}); "
                        "label a node with `ray start --resources '{\"NAME\": 1}'`")
    return chosen


def node_hardware() -> dict:
    """What this machine is: CPU, cores, GPUs with their driver, onnxruntime and its providers."""
    import onnxruntime as ort

    return {"host": socket.gethostname(), "cpu_model": _cpu_model(), "cpu_cores": os.cpu_count(), "gpus": _gpus(),
            "onnxruntime": ort.__version__, "providers": ort.get_available_providers(),
            "platform": platform.platform(), "python": platform.python_version()}


def _bench_task(shipped: dict[str, Shipped], options: BenchOptions, gemm24: bool) -> dict:
    hardware = node_hardware()
    try:
        paths = {role: materialise(value) for role, value in shipped.items()}
        if options.inputs is not None:  # real inputs are read on the node, as the models are
            options = replace(options, inputs=str(materialise(options.inputs)))
        result = run_bench(paths[MODEL], paths.get(BASELINE), options)
        if gemm24:
            from onnxprune.runtime_bench.gemm24 import bench_gemm24

            result["gemm24"] = bench_gemm24(paths[MODEL], options.batches, options.seqlen, options.warmup,
                                            options.runs)
    except UserError as exc:  # this node cannot measure (no provider works, a path it cannot see): say so
        return {"hardware": hardware, "error": str(exc)}
    return {"hardware": hardware, "bench": result}


def _labels(resources: dict) -> dict:
    return {k: v for k, v in resources.items() if not k.startswith(_RAY_BOOKKEEPING)}


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as info:
            for line in info:
                if line.startswith(("model name", "Model", "Hardware")):  # x86; Arm boards (Jetson, Raspberry Pi)
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _gpus() -> list[dict]:
    """NVIDIA GPUs as nvidia-smi lists them (name, driver, memory); none without nvidia-smi."""
    nvidia_smi = shutil.which("nvidia-smi")
    if nvidia_smi is None:
        return []
    try:
        listing = subprocess.run([nvidia_smi, "--query-gpu=name,driver_version,memory.total",
                                  "--format=csv,noheader"], capture_output=True, text=True, timeout=20, check=True)
    except (OSError, subprocess.SubprocessError):
        return []
    gpus = []
    for line in listing.stdout.strip().splitlines():
        name, driver, memory = (part.strip() for part in line.split(",", 2))
        gpus.append({"name": name, "driver": driver, "memory": memory})
    return gpus
