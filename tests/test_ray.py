"""`sweep --ray` and `bench --ray` on a local Ray cluster started by the tests (loopback only)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from conftest import REPO, assert_user_error, cli
from lm_fixtures import SEQLEN

from onnxprune.sweeps import read_results

try:
    import ray
except ImportError:
    ray = None

needs_ray = pytest.mark.skipif(ray is None, reason="ray is not installed (pip install -e '.[ray]')")


@pytest.fixture(scope="module")
def ray_address():
    """One local cluster for the module (starting one costs seconds): 2 CPUs, on 127.0.0.1."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    context = ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="WARNING",
                       _node_ip_address="127.0.0.1")
    yield context.address_info["address"]
    ray.shutdown()


def sweep_args(onnx_dir, eval_txt, out, methods="magnitude,wanda", levels="0.3,0.6", *extra):
    return ["sweep", onnx_dir / "model.onnx", "--methods", methods, "--levels", levels, "--calib", eval_txt,
            "--eval", eval_txt, "--nsamples", 4, "--seqlen", SEQLEN, "--max-windows", 2, "--max-new-tokens", 3,
            "-o", out, *extra]


def read(out):
    return read_results(out / "results.jsonl")


def by_cell(records):
    return {(r["method"], r["label"]): r for r in records}


@needs_ray
def test_ray_sweep_matches_sequential(onnx_dir, eval_txt, tmp_path, ray_address, capfd):
    cli(*sweep_args(onnx_dir, eval_txt, tmp_path / "seq")).ok()
    capfd.readouterr()
    import onnxprune  # the Python API runs the same sweep on Ray

    records = onnxprune.sweep(onnx_dir, tmp_path / "ray", ["magnitude", "wanda"], [0.3, 0.6], calib=eval_txt,
                              eval=eval_txt, nsamples=4, seqlen=SEQLEN, max_windows=2, max_new_tokens=3, ray="auto")
    log = capfd.readouterr().err
    assert records == read(tmp_path / "ray")
    sequential, distributed = by_cell(read(tmp_path / "seq")), by_cell(records)
    assert set(sequential) == set(distributed) and len(distributed) == 1 + 2 * 2
    for cell, expected in sequential.items():
        got = distributed[cell]
        assert got["status"] == expected["status"] == "ok", got
        assert got["perplexity"] == pytest.approx(expected["perplexity"], rel=1e-6), cell
        assert got["sample"] == expected["sample"] and got.get("sparsity") == expected.get("sparsity")
        assert got["node"]
    assert log.count("sweep: ") == 5, log  # one log line per finished cell
    for name in ("table.md", "samples.md"):
        assert (tmp_path / "ray" / name).read_text() == (tmp_path / "seq" / name).read_text()
    assert not list((tmp_path / "ray" / "models").iterdir()), "pruned models are removed unless --keep-models"


@needs_ray
def test_ray_sweep_retries_a_killed_worker(onnx_dir, eval_txt, tmp_path, ray_address, monkeypatch):
    """The first attempt of wanda/0.5 kills its worker process: Ray re-runs it and the sweep is
    complete; with --max-retries 0 the cell is recorded as failed with the reason."""
    monkeypatch.setenv("ONNXPRUNE_TEST_CRASH_ONCE", "wanda/0.5")
    out = tmp_path / "retried"
    cli(*sweep_args(onnx_dir, eval_txt, out, "wanda,sparsegpt", "0.5", "--one-shot", "--ray", "auto")).ok()
    assert (out / ".crashed-wanda-0.5").exists(), "the test hook did not kill the first attempt"
    records = read(out)
    assert [r["method"] for r in records].count("statistics") == 1  # one-shot statistics computed once
    assert all(r["status"] == "ok" for r in records), records
    assert set(by_cell(records)) == {("statistics", "one-shot"), ("dense", "0"), ("wanda", "0.5"), ("sparsegpt", "0.5")}

    out = tmp_path / "not-retried"
    cli(*sweep_args(onnx_dir, eval_txt, out, "wanda", "0.5", "--ray", "auto", "--max-retries", 0)).ok()
    failed = by_cell(read(out))[("wanda", "0.5")]
    assert failed["status"] == "error" and "after 0 retries" in failed["error"], failed
    assert "wanda at 0.5: error" in (out / "table.md").read_text()


@needs_ray
def test_ray_sweep_resumes_after_the_driver_is_killed(onnx_dir, eval_txt, tmp_path, ray_address):
    out = tmp_path / "killed"
    args = sweep_args(onnx_dir, eval_txt, out, "magnitude,wanda", "0.3,0.6", "--ray", ray_address)
    env = {**os.environ, "PYTHONPATH": str(REPO), "NO_COLOR": "1"}
    driver = subprocess.Popen([sys.executable, "-m", "onnxprune", *map(str, args)], cwd=REPO, env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    results = out / "results.jsonl"
    deadline = time.monotonic() + 600  # generous for a loaded machine: the loop ends once 2 cells are done
    while driver.poll() is None and time.monotonic() < deadline:
        if results.exists() and len(results.read_text().splitlines()) >= 3:  # the configuration + 2 cells
            break
        time.sleep(0.05)
    if driver.poll() is None:
        os.killpg(driver.pid, signal.SIGKILL)  # the driver and nothing else: the cluster is the test's
    driver.wait(timeout=60)
    first = read(out)
    assert 2 <= len(first) < 1 + 2 * 2, "the driver was not killed mid-sweep"

    cli(*args).ok()
    records = read(out)
    cells = [(r["method"], r["label"]) for r in records]
    assert len(cells) == len(set(cells)) == 1 + 2 * 2, "a finished cell was run again, or one is missing"
    assert records[:len(first)] == first
    assert all(r["status"] == "ok" for r in records), records


@needs_ray
def test_bench_ray_gives_the_node_table(onnx_dir, tmp_path, ray_address):
    dense = onnx_dir / "model.onnx"
    pruned = tmp_path / "pruned.onnx"
    cli("apply", dense, "-m", "magnitude", "-s", "0.5", "-o", pruned).ok()
    out = tmp_path / "bench"
    done = cli("bench", pruned, "--baseline", dense, "--ray", "auto", "--batch", "1,2", "--seqlen", 8, "--warmup", 1,
               "--runs", 3, "-o", out, "--json").ok()
    assert [(r["provider"], r["batch"]) for r in json.loads(done.out)["table"]] == [("cpu", 1), ("cpu", 2)]
    result = json.loads((out / "bench.json").read_text())
    [node] = result["nodes"]
    hardware = node["hardware"]
    assert hardware["cpu_cores"] >= 1 and hardware["cpu_model"] and hardware["onnxruntime"]
    assert "CPUExecutionProvider" in hardware["providers"]
    rows = node["bench"]["rows"]
    assert {(r["model"], r["provider"], r["batch"]) for r in rows} == {
        (role, "cpu", batch) for role in ("model", "baseline") for batch in (1, 2)}
    assert all(r["speedup"] > 0 for r in rows if r["model"] == "model")
    table = (out / "bench.md").read_text()
    assert "| node | provider | batch |" in table and hardware["cpu_model"] in table
    assert (out / "bench.png").read_bytes()[:4] == b"\x89PNG"

    line = assert_user_error(cli("bench", pruned, "--ray", "auto", "--nodes", "trt"))
    assert "no Ray node has the resources trt" in line


def test_ray_option_without_ray_says_how_to_install(onnx_dir, eval_txt, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` fails as if it were not installed
    for args in (sweep_args(onnx_dir, eval_txt, tmp_path / "s", "magnitude", "0.5", "--ray", "auto"),
                 ["bench", onnx_dir / "model.onnx", "--ray", "auto"]):
        line = assert_user_error(cli(*args))
        assert "pip install 'onnxprune[ray]'" in line
    assert not (tmp_path / "s" / "results.jsonl").exists()
