"""Append a result row to a section's table in docs/benchmarks.md (creating the section on first use)."""

from __future__ import annotations

from pathlib import Path


def append_row(path: str | Path, header: str, intro: str, columns: list[str], row: list[str]) -> None:
    """``header`` is the section title line (``## ...``); ``intro`` the text above the table."""
    out = Path(path)
    text = out.read_text() if out.exists() else "# Benchmarks\n"
    lines = text.rstrip("\n").split("\n")
    if header not in lines:
        lines += ["", header, "", *intro.strip().split("\n"), "", "| " + " | ".join(columns) + " |",
                  "|" + "---|" * len(columns)]  # fmt: skip
    start = lines.index(header)
    end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
    last = max(i for i in range(start, end) if lines[i].startswith("|"))
    lines.insert(last + 1, "| " + " | ".join(row) + " |")
    out.write_text("\n".join(lines) + "\n")
