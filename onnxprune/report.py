"""The pruning report: what was pruned, left dense and left alone, as JSON + Markdown, written atomically."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Protocol

from onnxprune.atomic import write_text_atomic
from onnxprune.samples import calibration_metadata


class Reportable(Protocol):
    def to_dict(self) -> dict: ...
    def markdown(self) -> str: ...


@dataclass
class TargetRecord:
    name: str
    node: str
    op: str
    shape: list[int]
    block: str | None
    params: int
    zeros: int
    sparsity: float
    nm_valid: bool | None
    bias_changed: bool = False


@dataclass
class Report:
    onnxprune_version: str
    input: str
    output: str
    method: str
    pattern: str
    sparsity: float
    seed: int
    targets: list[TargetRecord] = field(default_factory=list)
    skipped: list[dict] = field(default_factory=list)  # selected, but left dense: {name, node, reason}
    untouched: list[dict] = field(default_factory=list)  # found, not selected: {name, node, op, params, reason}
    allocation: dict[str, float] = field(default_factory=dict)  # per-block sparsity when not uniform
    emit: dict = field(default_factory=dict)  # what the hardware emitter did (onnxprune.emit)
    notes: list[str] = field(default_factory=list)  # advice for the user
    calibration: dict = field(default_factory=dict)  # the data used and its hash (samples.calibration_record)
    companions: list[str] = field(default_factory=list)  # tokenizer / config files copied beside the output
    timings_s: dict[str, float] = field(default_factory=dict)

    @property
    def totals(self) -> dict:
        params = sum(t.params for t in self.targets)
        zeros = sum(t.zeros for t in self.targets)
        return {"targets": len(self.targets), "params": params, "zeros": zeros,
                "sparsity": zeros / params if params else 0.0}

    def to_dict(self) -> dict:
        return {**asdict(self), "totals": self.totals}

    def provenance(self) -> dict:
        """Extra metadata_props entries for the output model (beyond method, pattern, sparsity)."""
        return {"targets": len(self.targets), "target": self.emit.get("target", "dense"),
                **calibration_metadata(self.calibration)}

    def markdown(self) -> str:
        totals = self.totals
        lines = [
            f"# onnxprune report: {self.method}, {self.pattern}, sparsity {self.sparsity:g}",
            "",
            f"- input: `{self.input}`",
            f"- output: `{self.output}`",
            f"- targets pruned: {totals['targets']}, weights {totals['params']:,}, zeros {totals['zeros']:,} "
            f"({totals['sparsity']:.2%})",
            "- wall time (s): " + ", ".join(f"{stage} {seconds:.3f}" for stage, seconds in self.timings_s.items()),
            "",
            markdown_table(["target", "op", "shape", "block", "sparsity", "N:M valid"],
                           [[t.node, t.op, "×".join(map(str, t.shape)), t.block or "-", f"{t.sparsity:.4f}",
                             "-" if t.nm_valid is None else ("yes" if t.nm_valid else "NO")] for t in self.targets]),
        ]
        if self.emit.get("target") == "compressed":
            totals = self.emit["totals"]
            lines += ["", "## Compressed storage", "",
                      f"{totals['tensors']} weights stored as bitmask + non-zeros: {totals['dense_bytes']:,} → "
                      f"{totals['encoded_bytes']:,} bytes ({totals['ratio']:.1%}); onnxruntime rebuilds them "
                      "bit-identically at session start."]
        if self.emit.get("target") == "tensorrt":
            from onnxprune.exporters.tensorrt import eligibility_markdown

            lines += ["", f"## TensorRT sparse-kernel eligibility ({self.emit['eligible']} of "
                          f"{len(self.emit['layers'])} layers)", "", eligibility_markdown(self.emit["layers"])]
        if self.notes:
            lines += ["", "## Notes", ""] + [f"- {note}" for note in self.notes]
        if self.skipped:
            lines += ["", "## Left dense", "", markdown_table(["target", "reason"],
                                                              [[s["node"], s["reason"]] for s in self.skipped])]
        if self.untouched:
            lines += ["", "## Not selected", "", markdown_table(["weight", "node", "op", "params", "reason"], [
                [u["name"], u["node"], u["op"], f"{u['params']:,}", u["reason"]] for u in self.untouched])]
        return "\n".join(lines) + "\n"


def write_report(report: Reportable, path: str | os.PathLike) -> tuple[Path, Path]:
    """`path` gets the JSON; the Markdown twin goes beside it with a .md suffix."""
    json_path = write_text_atomic(path, json.dumps(report.to_dict(), indent=2) + "\n")
    return json_path, write_text_atomic(Path(path).with_suffix(".md"), report.markdown())


def markdown_table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_cell(value) for value in row) + " |" for row in rows]
    return "\n".join(lines)


def _cell(value) -> str:
    """A table cell on one line: pipes escaped, line breaks shown as ⏎ (generated text has them)."""
    return str(value).replace("|", "\\|").replace("\r", "").replace("\n", " ⏎ ")
