"""Results as JSON + Markdown, written atomically."""

from __future__ import annotations

import json
import os
from pathlib import Path

from onnxprune.atomic import write_text_atomic
from onnxprune.pipeline import Report


def write_report(report: Report, path: str | os.PathLike) -> tuple[Path, Path]:
    """`path` gets the JSON; the Markdown twin goes beside it with a .md suffix."""
    json_path = write_text_atomic(path, json.dumps(report.to_dict(), indent=2) + "\n")
    markdown = report.markdown() if hasattr(report, "markdown") else report_markdown(report)  # structured has its own
    return json_path, write_text_atomic(Path(path).with_suffix(".md"), markdown)


def report_markdown(report: Report) -> str:
    totals = report.totals
    lines = [
        f"# onnxprune report: {report.method}, {report.pattern}, sparsity {report.sparsity:g}",
        "",
        f"- input: `{report.input}`",
        f"- output: `{report.output}`",
        f"- targets pruned: {totals['targets']}, weights {totals['params']:,}, zeros {totals['zeros']:,} "
        f"({totals['sparsity']:.2%})",
        "- wall time (s): " + ", ".join(f"{stage} {seconds:.3f}" for stage, seconds in report.timings_s.items()),
        "",
        markdown_table(["target", "op", "shape", "block", "sparsity", "N:M valid"],
                       [[t.node, t.op, "×".join(map(str, t.shape)), t.block or "-", f"{t.sparsity:.4f}",
                         "-" if t.nm_valid is None else ("yes" if t.nm_valid else "NO")] for t in report.targets]),
    ]
    if report.emit.get("target") == "compressed":
        totals = report.emit["totals"]
        lines += ["", "## Compressed storage", "",
                  f"{totals['tensors']} weights stored as bitmask + non-zeros: {totals['dense_bytes']:,} → "
                  f"{totals['encoded_bytes']:,} bytes ({totals['ratio']:.1%}); onnxruntime rebuilds them "
                  "bit-identically at session start."]
    if report.emit.get("target") == "tensorrt":
        from onnxprune.exporters.tensorrt import eligibility_markdown

        lines += ["", f"## TensorRT sparse-kernel eligibility ({report.emit['eligible']} of "
                      f"{len(report.emit['layers'])} layers)", "", eligibility_markdown(report.emit["layers"])]
    if report.notes:
        lines += ["", "## Notes", ""] + [f"- {note}" for note in report.notes]
    if report.skipped:
        lines += ["", "## Left dense", "", markdown_table(["target", "reason"],
                                                          [[s["node"], s["reason"]] for s in report.skipped])]
    if report.untouched:
        lines += ["", "## Not selected", "", markdown_table(["weight", "node", "op", "params", "reason"], [
            [u["name"], u["node"], u["op"], f"{u['params']:,}", u["reason"]] for u in report.untouched])]
    return "\n".join(lines) + "\n"


def markdown_table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_cell(value) for value in row) + " |" for row in rows]
    return "\n".join(lines)


def _cell(value) -> str:
    """A table cell on one line: pipes escaped, line breaks shown as ⏎ (generated text has them)."""
    return str(value).replace("|", "\\|").replace("\r", "").replace("\n", " ⏎ ")
