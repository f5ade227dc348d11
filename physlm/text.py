"""Numbers and tables as report text, and the reports' Jinja2 environment.

A number is written by its kind, declared where its column (or row) is made:

    loss      5.9020        4 decimals          ppl       365.78       2 decimals
    time      1,234.6       1 decimal           count     11,590       an integer
    fraction  0.117         3 decimals          percent   25.0%
    change    -4.88%        a relative change, signed

and without a kind an integer is a count and any other number gets 4 significant digits
(lambda, drift, a ratio), never scientific notation. `Table` is a DataFrame with the kinds
of its columns, or of its rows when its first column is "Setting" or "Metric".
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jinja2
import numpy as np
import pandas as pd

NA = "n/a"
FORMATS = {"loss": "{:,.4f}", "ppl": "{:,.2f}", "time": "{:,.1f}", "count": "{:,.0f}",
           "fraction": "{:.3f}", "percent": "{:.1%}", "change": "{:+.2%}"}
BY_ROW = ("Setting", "Metric")  # first columns of the tables whose rows have the kinds


def fmt(value: Any, kind: str | None = None) -> str:
    """One value as text, by `kind` (FORMATS), or by its type."""
    if isinstance(value, str):
        return value.replace("|", "\\|")
    if isinstance(value, list | tuple | np.ndarray):
        return ", ".join(fmt(v, kind) for v in value) or NA
    if value is None or pd.isna(value):
        return NA
    if isinstance(value, bool | np.bool_):
        return "yes" if value else "no"
    if kind or isinstance(value, int | np.integer) or not math.isfinite(x := float(value)):
        return FORMATS[kind or "count"].format(float(value))
    text = f"{x:,.{max(0, 3 - math.floor(math.log10(abs(x) or 1)))}f}"  # 4 significant digits
    return text.rstrip("0").rstrip(".") if "." in text else text


@dataclass
class Table:
    """A table and the kinds of its numbers: column (or row, see BY_ROW) title -> kind."""

    frame: pd.DataFrame
    kinds: dict[str, str] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.frame)


def rows(items: dict[str, Any], kinds: dict[str, str] | None = None,
         first: str = "Setting") -> Table:
    """A two-column `first` | Value table, one row per item, with the rows' kinds."""
    frame = pd.DataFrame({first: list(items), "Value": pd.Series(items.values(), dtype=object)})
    return Table(frame, kinds or {})


def table(data: Table | pd.DataFrame) -> str:
    """A table in markdown: values by kind, numeric columns right-aligned."""
    data = data if isinstance(data, Table) else Table(data)
    frame, kinds = data.frame, data.kinds
    if frame.empty:
        return "_(no rows)_"
    by_row = frame.columns[0] in BY_ROW
    cells = pd.DataFrame({
        name: [fmt(v, kinds.get(str(frame.iloc[i, 0]) if by_row else name))
               for i, v in enumerate(column)] for name, column in frame.items()})
    align = ["right" if pd.api.types.is_numeric_dtype(numbers := column.dropna().infer_objects())
             and numbers.dtype != bool else "left" for _, column in frame.items()]
    return cells.to_markdown(index=False, colalign=align, disable_numparse=True)


# What a markdown table cell, and the HTML page made from it, would read as markup instead of
# text: HTML (<, >, &), a cell boundary (|), code (`), emphasis (*, _, ~), a link ([) and the
# escape character itself. Each is written as its character reference, which markdown and
# HTML show as the character.
LITERAL = str.maketrans({"&": "&amp;", "<": "&lt;", ">": "&gt;",
                        **{char: f"&#{ord(char)};" for char in "|`*_~[\\"}})


def literal(text: str) -> str:
    """`text` (a model's words: anything) shown as itself in a markdown table cell and in
    the HTML page made from it, on one line."""
    return " ".join(text.split()).translate(LITERAL)


def portable(path: str | Path) -> str:
    """`path` relative to the working directory, or its name when it lies elsewhere: no
    report names a machine's folders."""
    path, here = Path(path).resolve(), Path.cwd().resolve()
    return path.relative_to(here).as_posix() if path.is_relative_to(here) else path.name


def paragraph(text: str) -> str:
    """A block of template lines as one line of text (a markdown paragraph), ending the line."""
    return " ".join(line.strip() for line in text.splitlines() if line.strip()) + "\n"


def environment() -> jinja2.Environment:
    """The reports' templates (physlm/templates) with the filters fmt, table, portable and
    paragraph; an undefined name is an error, never an empty string. An HTML template
    (*.html.j2) escapes every value it is given unless marked safe."""
    env = jinja2.Environment(loader=jinja2.PackageLoader("physlm"), trim_blocks=True,
                             lstrip_blocks=True, undefined=jinja2.StrictUndefined,
                             autoescape=jinja2.select_autoescape(["html.j2"],
                                                                 default_for_string=False))
    env.filters.update(fmt=fmt, table=table, portable=portable, paragraph=paragraph)
    return env
