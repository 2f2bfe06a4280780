"""The CV report's documents: ``Section`` lists rendered as Markdown and HTML (pure layer).

Also the cell formatting (``format_value``, ``mean_std``), the summary tables of
``report_scores`` output (``stage_table``, ``spread_table``) and ``json_ready`` for a
strict-JSON ``metrics.json``.
"""

from __future__ import annotations

import base64
import html
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pipeline.core.report_scores import METRIC_COLUMNS


@dataclass
class Section:
    """One part of the report: paragraphs, then captioned tables, then captioned PNGs."""

    title: str
    paragraphs: list[str] = field(default_factory=list)
    tables: list[tuple[str, pd.DataFrame]] = field(default_factory=list)
    images: list[tuple[str, Path]] = field(default_factory=list)


def format_value(value: Any, digits: int = 4) -> str:
    """A table cell: floats to ``digits`` decimals, NaN as ``n/a``, the rest as ``str``."""
    if isinstance(value, float | np.floating):
        if np.isnan(value):
            return "n/a"
        # Values too small for the fixed digits (a rounding difference, a short run's
        # energy) keep two significant digits instead of showing as 0.
        small = value != 0 and abs(float(value)) < 0.5 * 10.0**-digits
        return f"{value:.1e}" if small else f"{value:.{digits}f}"
    return str(value)


def mean_std(mean: float, std: float, digits: int = 4) -> str:
    """``"0.6512 ± 0.0123"``; ``n/a`` for NaN."""
    if np.isnan(mean):
        return "n/a"
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def stage_table(summary: pd.DataFrame, pooled: pd.DataFrame, metric: str) -> pd.DataFrame:
    """class x stage: ``mean ± std`` over folds of ``metric``, then its pooled value per stage.

    ``summary`` is ``summarise_folds`` output, ``pooled`` ``score_table(..., pooled=True)``.
    """
    stages = list(dict.fromkeys(summary["stage"]))
    out = pd.DataFrame({"class": list(dict.fromkeys(summary["class"]))})
    for stage in stages:
        rows = summary[summary["stage"] == stage].set_index("class").reindex(out["class"])
        means, stds = rows[f"{metric}_mean"], rows[f"{metric}_std"]
        out[f"{stage} (folds)"] = [mean_std(m, s) for m, s in zip(means, stds, strict=True)]
    for stage in stages:
        values = pooled[pooled["stage"] == stage].set_index("class")[metric]
        out[f"{stage} (pooled)"] = values.reindex(out["class"]).to_numpy()
    return out


def spread_table(summary: pd.DataFrame, stage: str) -> pd.DataFrame:
    """One stage's ``mean ± std`` over folds of every metric, one row per class."""
    rows = summary[summary["stage"] == stage]
    out = pd.DataFrame({"class": rows["class"].to_numpy(), "folds": rows["n_folds"].to_numpy()})
    for metric in METRIC_COLUMNS:
        means, stds = rows[f"{metric}_mean"], rows[f"{metric}_std"]
        out[metric] = [mean_std(m, s) for m, s in zip(means, stds, strict=True)]
    return out


def json_ready(value: Any) -> Any:
    """NaN and inf -> None, numpy scalars -> Python, recursively: strict JSON."""
    if isinstance(value, Mapping):
        return {str(k): json_ready(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_ready(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not np.isfinite(value):
        return None
    return value


def _cells(frame: pd.DataFrame) -> list[list[str]]:
    return [[format_value(v) for v in row] for row in frame.itertuples(index=False)]


def render_markdown(title: str, sections: Sequence[Section]) -> str:
    """The report as Markdown; images are referenced by file name (same folder)."""
    lines = [f"# {title}", ""]
    for section in sections:
        lines += [f"## {section.title}", ""]
        for paragraph in section.paragraphs:
            lines += [paragraph, ""]
        for caption, frame in section.tables:
            if caption:
                lines += [f"**{caption}**", ""]
            lines.append("| " + " | ".join(map(str, frame.columns)) + " |")
            lines.append("|" + "---|" * len(frame.columns))
            lines += ["| " + " | ".join(row) + " |" for row in _cells(frame)]
            lines.append("")
        for caption, path in section.images:
            lines += [f"![{caption}]({Path(path).name})", "", f"*{caption}*", ""]
    return "\n".join(lines)


def render_html(title: str, sections: Sequence[Section]) -> str:
    """The report as one self-contained HTML page, every PNG embedded as base64."""
    esc = html.escape
    parts = [
        "<!DOCTYPE html>",
        '<html><head><meta charset="utf-8">',
        f"<title>{esc(title)}</title>",
        "<style>body{font-family:sans-serif;max-width:1200px;margin:auto;padding:1em}"
        "table{border-collapse:collapse;margin:0.5em 0 1.5em;font-size:13px}"
        "td,th{border:1px solid #ccc;padding:2px 6px;text-align:right}"
        "th{background:#f2f2f2}img{max-width:100%}</style>",
        f"</head><body><h1>{esc(title)}</h1>",
    ]
    for section in sections:
        parts.append(f"<h2>{esc(section.title)}</h2>")
        parts += [f"<p>{esc(paragraph)}</p>" for paragraph in section.paragraphs]
        for caption, frame in section.tables:
            if caption:
                parts.append(f"<p><b>{esc(caption)}</b></p>")
            head = "".join(f"<th>{esc(str(c))}</th>" for c in frame.columns)
            body = "".join(
                "<tr>" + "".join(f"<td>{esc(cell)}</td>" for cell in row) + "</tr>"
                for row in _cells(frame)
            )
            parts.append(f"<table><tr>{head}</tr>{body}</table>")
        for caption, path in section.images:
            data = base64.b64encode(Path(path).read_bytes()).decode("ascii")
            parts.append(
                f'<figure><img src="data:image/png;base64,{data}" alt="{esc(caption)}">'
                f"<figcaption>{esc(caption)}</figcaption></figure>"
            )
    parts.append("</body></html>")
    return "\n".join(parts)
