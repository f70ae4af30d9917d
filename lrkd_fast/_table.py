"""Plain-text tables for reports and the command line."""
from __future__ import annotations

__all__ = ["format_table"]


def format_table(head: list[str], rows: list[list[str]]) -> str:
    """Columns padded to their widest cell: the first left-aligned, the others right-aligned, a rule
    of dashes under the header."""
    if any(len(r) != len(head) for r in rows):
        raise ValueError(f"every row needs {len(head)} cells (one per header), got {[len(r) for r in rows]}")
    widths = [max(len(str(r[i])) for r in [head] + rows) for i in range(len(head))]

    def line(r):
        return "  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w) for i, (c, w) in enumerate(zip(r, widths)))

    return "\n".join([line(head), "  ".join("-" * w for w in widths)] + [line(r) for r in rows])
