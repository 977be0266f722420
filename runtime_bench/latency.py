"""Latency of MODEL (and of its dense --baseline) per execution provider and batch size.

Per (provider, batch) cell: `warmup` untimed runs of each model, then up to `runs` timed rounds
(or until `max_seconds` have passed), each round running every model once, timed with
`time.perf_counter` around `session.run`. That is the latency a caller sees, host↔device copies
of inputs and outputs included. Reported: p50, p90, mean (ms), throughput = batch / mean
(samples/s), speed-up = baseline p50 / model p50 from the same rounds, and two output checks:
every provider against the CPU output of the same model (pass/fail at a tolerance), and the model
against the baseline (informational: pruning is meant to change the outputs a little). With a
baseline, onnxruntime's thread spinning is off for both sessions (see ProviderSettings.spin).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from onnxprune.errors import UserError, first_line
from onnxprune.progress import progress_bar
from onnxprune.runtime_bench.inputs import InputMaker
from onnxprune.runtime_bench.providers import ProviderSettings, ProviderUnavailable, open_provider_session

MODEL, BASELINE = "model", "baseline"


@dataclass
class BenchOptions:
    providers: list[str] = field(default_factory=lambda: ["cpu"])
    batches: list[int] = field(default_factory=lambda: [1])
    seqlen: int = 128
    warmup: int = 5
    runs: int = 30
    max_seconds: float | None = None  # per cell: stop the timed rounds after this long (at least one round)
    settings: ProviderSettings = field(default_factory=ProviderSettings)
    inputs: str | os.PathLike | None = None  # .npz of real inputs instead of synthetic ones
    tolerance: float | None = None  # provider vs CPU: max |Δ| ≤ tolerance · max(1, max |CPU output|)

    @property
    def check_tolerance(self) -> float:
        if self.tolerance is not None:
            return self.tolerance
        return 1e-2 if self.settings.fp16 else 1e-3


class _RunFailed(Exception):
    pass


def run_bench(model: str | os.PathLike, baseline: str | os.PathLike | None, options: BenchOptions) -> dict:
    """Benchmark `model` (and `baseline`) over options.providers × options.batches; see the module docstring."""
    paths = {MODEL: Path(model)} | ({BASELINE: Path(baseline)} if baseline is not None else {})
    options = replace(options, settings=replace(options.settings, spin=options.settings.spin and baseline is None))
    # CPU sessions always exist: they read the signature and give the reference outputs.
    cpu = {role: _cpu_session(path, options.settings) for role, path in paths.items()}
    maker = InputMaker(paths[MODEL], cpu[MODEL], options.seqlen, options.inputs)
    if BASELINE in cpu:
        maker.check_signature(cpu[BASELINE], f"the baseline {paths[BASELINE]}")
    references: dict[tuple[str, int], list[np.ndarray]] = {}
    rows, problems, sessions = [], [], {}
    for provider, batch in progress_bar([(p, b) for p in options.providers for b in options.batches], "bench"):
        if provider not in sessions:
            sessions.clear()  # one provider's sessions (and GPU memory) at a time
            sessions[provider] = _open_all(paths, provider, options.settings, cpu, problems)
        if sessions[provider] is None:
            continue
        feeds = maker.feeds(batch)
        try:
            times, outputs = measure(sessions[provider], feeds, options.warmup, options.runs, options.max_seconds)
            if provider == "cpu":
                references.update({(role, batch): out for role, out in outputs.items()})
            for role in paths:
                references.setdefault((role, batch), _run(cpu[role], feeds))
        except _RunFailed as exc:
            problems.append({"provider": provider, "batch": batch, "reason": f"run failed: {exc}"})
            continue
        rows += _rows(provider, batch, times, outputs, references, options.check_tolerance)
    if not rows:
        reasons = "; ".join(dict.fromkeys(f"{p['provider']}: {p['reason']}" for p in problems))
        raise UserError(f"nothing could be measured ({reasons})")
    import onnxruntime as ort

    return {"models": {role: str(path) for role, path in paths.items()}, "labels": model_labels(paths),
            "inputs": maker.source, "seqlen": options.seqlen, "warmup": options.warmup, "runs": options.runs,
            "max_seconds": options.max_seconds, "threads": options.settings.threads,
            "spinning": options.settings.spin, "fp16": options.settings.fp16,
            "tolerance": options.check_tolerance, "onnxruntime": ort.__version__, "cpu_count": os.cpu_count(),
            "rows": rows, "unavailable": problems}


def measure(sessions: dict, feeds: dict, warmup: int, runs: int, max_seconds: float | None = None):
    """Seconds per timed run for each session, and each session's outputs of its last run."""
    calls = {role: (lambda session=session: _run(session, feeds)) for role, session in sessions.items()}
    return round_robin(calls, warmup, runs, max_seconds)


def wall_timer(fn: Callable) -> tuple[float, object]:
    """(seconds, result) of one call, by time.perf_counter."""
    begin = time.perf_counter()
    result = fn()
    return time.perf_counter() - begin, result


def round_robin(calls: dict[str, Callable], warmup: int, runs: int, max_seconds: float | None = None,
                timer: Callable = wall_timer) -> tuple[dict[str, list[float]], dict[str, object]]:
    """`warmup` untimed calls of each, then up to `runs` timed rounds (fewer once `max_seconds`
    have passed, never fewer than one): seconds per call, and each call's last result.

    The calls run round-robin, one each per round, rather than all runs of one and then all of
    the other: clocks, turbo boost, thermal throttling and other processes drift over seconds,
    and back-to-back blocks would charge that drift to whichever model ran second. In the same
    rounds both models see the same conditions, so their p50 ratio measures the models. The
    order inside a round alternates (A B, B A, …) so neither always runs on caches and clocks
    warmed by the other.
    """
    names = list(calls)
    for _ in range(warmup):
        for name in names:
            calls[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    results: dict[str, object] = {}
    started = time.perf_counter()
    for index in range(max(runs, 1)):
        for name in (names if index % 2 == 0 else names[::-1]):
            seconds, results[name] = timer(calls[name])
            times[name].append(seconds)
        if max_seconds is not None and time.perf_counter() - started >= max_seconds:
            break
    return times, results


def compare(outputs: list[np.ndarray], reference: list[np.ndarray]) -> dict:
    """Largest |a − b| over all outputs, cosine of the flattened outputs (lowest over outputs), and
    the largest |reference| (the scale a tolerance is relative to)."""
    if [o.shape for o in outputs] != [r.shape for r in reference]:
        return {"max_abs_diff": float("inf"), "cosine": float("nan"), "scale": 0.0,
                "note": f"shapes {[list(o.shape) for o in outputs]} vs {[list(r.shape) for r in reference]}"}
    diff, cosine, scale = 0.0, 1.0, 0.0
    for a, b in zip(outputs, reference):
        a, b = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
        if a.size == 0:
            continue
        diff = max(diff, float(np.max(np.abs(a - b))))
        scale = max(scale, float(np.max(np.abs(b))))
        norms = float(np.linalg.norm(a) * np.linalg.norm(b))
        cosine = min(cosine, float(a @ b) / norms if norms > 0 else float(np.array_equal(a, b)))
    return {"max_abs_diff": diff, "cosine": cosine, "scale": scale}


def _rows(provider: str, batch: int, times: dict, outputs: dict, references: dict, tolerance: float) -> list[dict]:
    p50 = {role: float(np.percentile(t, 50)) for role, t in times.items()}
    rows = []
    for role, seconds in times.items():
        mean = float(np.mean(seconds))
        row = {"model": role, "provider": provider, "batch": batch, "runs": len(seconds),
               "p50_ms": p50[role] * 1e3, "p90_ms": float(np.percentile(seconds, 90)) * 1e3, "mean_ms": mean * 1e3,
               "min_ms": float(np.min(seconds)) * 1e3, "throughput": batch / mean if mean > 0 else float("inf"),
               "outputs_check": _check(provider, outputs[role], references[(role, batch)], tolerance)}
        if role == MODEL and BASELINE in times:
            row["speedup"] = p50[BASELINE] / p50[MODEL] if p50[MODEL] > 0 else float("inf")
            row["vs_baseline"] = compare(outputs[MODEL], outputs[BASELINE])
        rows.append(row)
    return rows


def _check(provider: str, outputs: list[np.ndarray], reference: list[np.ndarray], tolerance: float) -> dict:
    finite = all(np.isfinite(o).all() for o in outputs if np.issubdtype(o.dtype, np.number))
    if provider == "cpu":  # this is the reference: only finiteness can fail
        return {"status": "reference" if finite else "mismatch", "passed": finite, "finite": finite}
    found = compare(outputs, reference)
    passed = finite and found["max_abs_diff"] <= tolerance * max(1.0, found["scale"])
    return {"status": "ok" if passed else "mismatch", "passed": passed, "finite": finite, **found}


def _cpu_session(path: Path, settings: ProviderSettings):
    if not path.exists():
        raise UserError(f"model file not found: {path}")
    try:
        return open_provider_session(path, "cpu", settings)
    except ProviderUnavailable as exc:
        raise UserError(f"onnxruntime cannot load {path}: {exc}") from None


def _open_all(paths: dict, provider: str, settings: ProviderSettings, cpu: dict, problems: list) -> dict | None:
    if provider == "cpu":
        return cpu
    try:
        return {role: open_provider_session(path, provider, settings) for role, path in paths.items()}
    except ProviderUnavailable as exc:
        problems.append({"provider": provider, "batch": None, "reason": str(exc)})
        return None


def _run(session, feeds: dict) -> list[np.ndarray]:
    try:
        return session.run(None, feeds)
    except Exception as exc:
        raise _RunFailed(first_line(exc)) from None


def model_labels(paths: dict[str, Path]) -> dict[str, str]:
    """File names, or parent/name when the model and the baseline share a file name."""
    names = {role: path.name for role, path in paths.items()}
    if len(set(names.values())) < len(names):
        names = {role: f"{path.parent.name}/{path.name}" for role, path in paths.items()}
    return names


def parse_batches(text: str) -> list[int]:
    """'1,8' → [1, 8]; anything but positive integers is a UserError."""
    values = [v.strip() for v in text.split(",") if v.strip()]
    if not values or not all(v.isdigit() and int(v) > 0 for v in values):
        raise UserError(f"--batch must be positive integers separated by commas, got {text!r}")
    return list(dict.fromkeys(int(v) for v in values))
