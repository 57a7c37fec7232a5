"""Markdown tables of the reports and benchmark pages: pandas' DataFrame.to_markdown (tabulate's pipe format).

Cells come in as the strings the table shows (each caller formats its numbers: 1 decimal, a sign, bold markup), so
to_markdown only lays them out: columns padded to one width, a right-aligned column's separator `--:`.
"""
from __future__ import annotations

ALIGN = {"l": "left", "r": "right", "c": "center"}


def markdown_table(header: list[str], rows: list[list[str]], align: str) -> list[str]:
    """The table's lines: header, separator, one line per row. align: a letter per column, l(eft) / r(ight) /
    c(entre) (numbers right-aligned); the last letter repeats over any further columns."""
    import pandas as pd

    letters = (align + align[-1] * len(header))[:len(header)]
    frame = pd.DataFrame([[str(c) for c in row] for row in rows], columns=list(header), dtype=object)
    text = frame.to_markdown(index=False, tablefmt="pipe", colalign=[ALIGN[a] for a in letters],
                             disable_numparse=True)
    return text.splitlines()
