"""The study report: one self-contained, offline HTML page saying how the study went.

``report.html`` lands in the study's output folder next to
``study_dice.csv``: a summary, the per-patient Dice table (failed patients
marked, with the reason), box plots of Dice per label (embedded PNG), every
patient's QC figure and trajectory animation (relative links to
``<patient>/qc.png`` and ``<patient>/trajectory.gif``, so the folder can be
moved or zipped as a whole), the parameters of every stage and the versions
of the packages used.  No network access, no external script or style.

The page is deterministic (no timestamp) and rewritten only when its content
changes, so rerunning a cached study leaves every output file untouched.
"""

from __future__ import annotations

import base64
import html
import io as _bytes_io
import math
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from . import __version__, io

REPORT_NAME = "report.html"
#: Study-table columns that are not per-label Dice (see :func:`nipype_inrlddmm.steps.study_row`).
SUMMARY_COLUMNS = ("patient", "status", "mean_dice", "mean_hd95_mm", "jacobian_min", "jacobian_nonpositive_percent",
                   "sdlogj", "missing_labels", "error")
#: Per-patient figures linked from the report, by file name in ``<out_dir>/<patient>/``.
PATIENT_FIGURES = {"qc.png": "QC figure", "trajectory.gif": "trajectory"}

_STYLE = """
body { font-family: sans-serif; margin: 1.5em; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; font-size: 0.9em; }
th, td { border: 1px solid #bbb; padding: 0.25em 0.6em; text-align: right; }
th { background: #eee; } td.text { text-align: left; }
tr.failed td { background: #fdd; } tr.failed td.status { color: #b00; font-weight: bold; }
.figure { display: inline-block; margin: 0 1em 1em 0; vertical-align: top; }
.figure img { max-width: 48em; border: 1px solid #ccc; }
img.missing { outline: 3px solid #b00; }
"""
#: Marks each image with its loaded width, and outlines images that failed to load (a moved or
#: deleted figure), so a reader sees a broken link at once and a headless browser can check it.
_SCRIPT = """
window.addEventListener("load", function () {
  for (const image of document.images) {
    image.dataset.loadedWidth = image.naturalWidth;
    if (!image.naturalWidth) { image.classList.add("missing"); }
  }
});
"""


def _escape(value) -> str:
    return html.escape(str(value), quote=True)


def _number(value):
    """A float from a table cell (rows from run_study hold floats, rows from a CSV strings), else None."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(number) else number


def label_columns(rows: list[dict]) -> list[str]:
    """The per-label Dice columns of the study table, in table order."""
    columns = []
    for row in rows:
        columns += [key for key in row if key not in SUMMARY_COLUMNS and key not in columns]
    return columns


def dice_boxplot(rows: list[dict]) -> bytes | None:
    """PNG of box plots of Dice per label over the successful patients (points overlaid); None without data."""
    labels = label_columns(rows)
    values = [[v for row in rows if row.get("status") == "ok" and (v := _number(row.get(label))) is not None]
              for label in labels]
    kept = [(label, v) for label, v in zip(labels, values) if v]
    if not kept:
        return None
    figure = Figure(figsize=(max(4.0, 0.8 * len(kept) + 1.5), 3.6), dpi=90)
    FigureCanvasAgg(figure)
    axis = figure.add_subplot()
    axis.boxplot([v for _, v in kept], showfliers=False)
    for position, (_, v) in enumerate(kept, start=1):
        jitter = np.linspace(-0.12, 0.12, len(v)) if len(v) > 1 else [0.0]
        axis.plot(position + np.asarray(jitter), v, "o", color="tab:blue", alpha=0.7, markersize=4)
    axis.set_xticks(range(1, len(kept) + 1), [label for label, _ in kept], rotation=45, ha="right", fontsize=8)
    axis.set_ylabel("Dice")
    axis.set_ylim(min(0.0, *(min(v) for _, v in kept)), 1.0)
    axis.grid(axis="y", alpha=0.3)
    figure.tight_layout()
    buffer = _bytes_io.BytesIO()
    figure.savefig(buffer, format="png", metadata={"Software": None})
    return buffer.getvalue()


def _table(rows: list[dict], labels: list[str]) -> str:
    columns = ["patient", "status", *labels, "mean_dice", "mean_hd95_mm", "jacobian_min",
               "jacobian_nonpositive_percent", "sdlogj"]
    header = "".join(f"<th>{_escape(c)}</th>" for c in columns + ["notes"])
    body = []
    for row in rows:
        failed = row.get("status") != "ok"
        cells = []
        for column in columns:
            value = row.get(column, "")
            number = None if column in ("patient", "status") else _number(value)
            if column == "status":
                cells.append(f'<td class="text status">{"FAILED" if failed else "ok"}</td>')
            elif number is not None:
                cells.append(f"<td>{number:.3f}</td>" if column in labels or column == "mean_dice"
                             else f"<td>{number:.4g}</td>")
            else:
                cells.append(f'<td class="text">{_escape(value)}</td>')
        notes = row.get("error") if failed else row.get("missing_labels")
        cells.append(f'<td class="text">{_escape(notes or "")}</td>')
        body.append(f'<tr class="{"failed" if failed else "ok"}" data-patient="{_escape(row["patient"])}">'
                    + "".join(cells) + "</tr>")
    return f'<table id="dice-table"><thead><tr>{header}</tr></thead><tbody>{"".join(body)}</tbody></table>'


def _parameters(parameters: dict) -> str:
    rows = []
    for section, values in parameters.items():
        if isinstance(values, dict):
            for name, value in values.items():
                rows.append(f'<tr><td class="text">{_escape(section)}</td><td class="text">{_escape(name)}</td>'
                            f'<td class="text">{_escape(value)}</td></tr>')
        else:
            rows.append(f'<tr><td class="text" colspan="2">{_escape(section)}</td>'
                        f'<td class="text">{_escape(values)}</td></tr>')
    return ('<table id="parameters"><thead><tr><th>stage</th><th>parameter</th><th>value</th></tr></thead>'
            f'<tbody>{"".join(rows)}</tbody></table>')


def versions() -> dict[str, str]:
    """Versions of this package and of the libraries that shaped the results."""
    import nibabel
    import nipype
    import torch

    return {"nipype_inrlddmm": __version__, "torch": torch.__version__, "nipype": nipype.__version__,
            "nibabel": nibabel.__version__, "numpy": np.__version__}


def study_report_html(rows: list[dict], *, figures: dict[str, dict[str, str]] | None = None,
                      parameters: dict | None = None, title: str = "INR-LDDMM study") -> str:
    """The report page as a string.

    Parameters
    ----------
    rows : the study table (:func:`nipype_inrlddmm.workflows.run_study`'s
        rows, or ``study_dice.csv`` read with :class:`csv.DictReader`).
    figures : ``{patient: {caption: relative URL}}``, shown in table order.
    parameters : ``{stage: {parameter: value}}`` (or ``{name: value}``).
    """
    figures = figures or {}
    labels = label_columns([row for row in rows if row.get("status") == "ok"] or rows)
    ok = [row for row in rows if row.get("status") == "ok"]
    means = [m for row in ok if (m := _number(row.get("mean_dice"))) is not None]
    summary = (f"{len(rows)} patients: {len(ok)} registered, {len(rows) - len(ok)} failed"
               + (f"; mean Dice over patients {np.mean(means):.3f} (min {min(means):.3f}, max {max(means):.3f})"
                  if means else ""))
    parts = [
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">', f"<title>{_escape(title)}</title>",
        f"<style>{_STYLE}</style><script>{_SCRIPT}</script></head><body>",
        f"<h1>{_escape(title)}</h1>", f'<p id="summary">{_escape(summary)}</p>',
        "<h2>Dice per patient and label</h2>", _table(rows, labels),
    ]
    plot = dice_boxplot(rows)
    if plot is not None:
        encoded = base64.b64encode(plot).decode("ascii")
        parts += ["<h2>Dice per label</h2>",
                  f'<div class="figure"><img id="dice-boxplot" alt="box plots of Dice per label" '
                  f'src="data:image/png;base64,{encoded}"></div>']
    if figures:
        parts.append("<h2>QC figures</h2>")
        for row in rows:
            patient = row["patient"]
            for caption, url in figures.get(patient, {}).items():
                parts.append(f'<div class="figure"><h3>{_escape(patient)}: {_escape(caption)}</h3>'
                             f'<a href="{_escape(url)}"><img class="qc" alt="{_escape(patient)} {_escape(caption)}" '
                             f'src="{_escape(url)}"></a></div>')
    parts += ["<h2>Parameters</h2>", _parameters(parameters or {}),
              "<h2>Versions</h2>", _parameters({"packages": versions()}), "</body></html>"]
    return "\n".join(parts) + "\n"


def write_study_report(out_dir, rows: list[dict], *, parameters: dict | None = None,
                       title: str = "INR-LDDMM study") -> Path:
    """Write ``out_dir/report.html`` for a study whose results are in ``out_dir``.

    Links every ``<out_dir>/<patient>/qc.png`` and ``trajectory.gif`` that
    exists.  Written atomically, and only when the content changed.
    """
    out_dir = Path(out_dir)
    path = out_dir / REPORT_NAME
    figures = {}
    for row in rows:
        found = {caption: f"{row['patient']}/{name}" for name, caption in PATIENT_FIGURES.items()
                 if (out_dir / row["patient"] / name).is_file()}
        if found:
            figures[row["patient"]] = found
    text = study_report_html(rows, figures=figures, parameters=parameters, title=title)
    if path.is_file() and path.read_text(encoding="utf-8") == text:
        return path
    with io.atomic_path(path) as temporary:
        Path(temporary).write_text(text, encoding="utf-8")
    return path

