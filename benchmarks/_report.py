"""Write a benchmark's results into BENCHMARKS.md between its own markers (replacing an older run)."""

from __future__ import annotations

from pathlib import Path


def write_section(path: Path, name: str, title: str, body: str) -> str:
    """Put ``body`` between ``<!-- name:begin -->``/``<!-- name:end -->`` in ``path``; a new
    section gets the heading ``## title``. Returns the marked block."""
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    block = f"{begin}\n{body}\n{end}"
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    if begin in text:
        text = text[: text.index(begin)] + block + text[text.index(end) + len(end):]
    else:
        text += f"\n## {title}\n\n{block}\n"
    path.write_text(text)
    return block
