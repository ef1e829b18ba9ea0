"""The study report: one self-contained, offline HTML page saying how the study went.

``report.html`` lands in the study's output folder next to
``study_dice.csv``: a summary, the per-patient table (failed patients
marked, with the reason), the per-label Dice in tables of at most
:data:`LABELS_PER_TABLE` labels so that the page never scrolls sideways,
box plots of Dice per label before and after registration (embedded PNG,
on an axis fitted to the values so that the change shows), every
patient's QC figure and trajectory animation (relative links to
``<patient>/qc.png`` and ``<patient>/trajectory.gif``, so the folder can be
moved or zipped as a whole), the parameters of every stage and the versions
of the packages used.  No network access, no external script or style.

The page is deterministic (no timestamp) and rewritten only when its content
changes, so rerunning a cached study leaves every output file untouched.
"""

from __future__ import annotations

import base64
import csv
import html
import math
import platform
import shlex
import sys
import time
from io import BytesIO
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from .. import __version__, io

REPORT_NAME = "report.html"
#: Study-table columns that are not per-label Dice (see :func:`nipype_inrlddmm.evaluation.study_row`).
SUMMARY_COLUMNS = ("patient", "status", "mean_dice", "mean_hd95_mm", "jacobian_min", "jacobian_nonpositive_percent",
                   "sdlogj", "missing_labels", "error")
#: Per-patient figures linked from the report, by file name in ``<out_dir>/<patient>/``.
PATIENT_FIGURES = {"qc.png": "QC figure", "trajectory.gif": "trajectory"}
#: Label columns per Dice table: a study of 30 brain labels is cut into tables of this many, each as
#: wide as the page at most (fixed layout, headers wrapped), so nothing scrolls sideways at 1400 px.
LABELS_PER_TABLE = 10
#: Columns of the per-patient table, with their headers: the same few whatever the number of labels.
PATIENT_COLUMNS = {"patient": "patient", "status": "status", "mean_dice_before": "mean Dice before",
                   "mean_dice": "mean Dice", "mean_hd95_mm": "mean HD95 (mm)", "jacobian_min": "min det J",
                   "jacobian_nonpositive_percent": "% det J \u2264 0", "sdlogj": "SDlogJ"}
#: One number format per column: the same decimals down a column, whatever the value.
_FORMATS = {"mean_dice_before": ".3f", "mean_dice": ".3f", "mean_hd95_mm": ".2f", "jacobian_min": ".3f",
            "jacobian_nonpositive_percent": ".3f", "sdlogj": ".3f"}

_STYLE = """
body { font-family: sans-serif; margin: 1.5em; color: #222; max-width: 100%; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; font-size: 0.9em; max-width: 100%; }
table.labels { table-layout: fixed; } table.labels.wide { width: 100%; }
th, td { border: 1px solid #bbb; padding: 0.25em 0.6em; text-align: right; overflow-wrap: anywhere; }
th { background: #eee; } td.text { text-align: left; }
tr.failed td { background: #fdd; } tr.failed td.status { color: #b00; font-weight: bold; }
td .before { color: #777; font-size: 0.85em; }
.figure { display: inline-block; margin: 0 1em 1em 0; vertical-align: top; max-width: 100%; }
.figure img { max-width: min(48em, 100%); height: auto; border: 1px solid #ccc; }
.figure img#dice-boxplot { max-width: 100%; }
img.missing { outline: 3px solid #b00; }
"""
#: Marks each image with its loaded width, and outlines images that failed to load (a moved or
#: deleted figure), so a reader sees a broken link at once and a headless browser can check it; the
#: page's scroll width goes on ``<body>`` so that a test can check nothing scrolls sideways.
_SCRIPT = """
window.addEventListener("load", function () {
  for (const image of document.images) {
    image.dataset.loadedWidth = image.naturalWidth;
    if (!image.naturalWidth) { image.classList.add("missing"); }
  }
  document.body.dataset.scrollWidth = document.documentElement.scrollWidth;
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


def dice_axis_limits(values) -> tuple[float, float]:
    """The Dice axis of the per-label plot: the values' range, padded by a tenth of it (0.01 at least).

    Dice of a good registration sits in a few hundredths below 1, where a 0-1 axis shows neither the
    spread nor the gain over the unregistered labels; the axis never leaves [0, 1.005].
    """
    values = [float(v) for v in values]
    low, high = min(values), max(values)
    pad = max(0.1 * (high - low), 0.01)
    return max(0.0, low - pad), min(1.005, high + pad)


def dice_boxplot(rows: list[dict], before: dict[str, dict[str, float]] | None = None) -> bytes | None:
    """PNG of box plots of Dice per label over the successful patients (points overlaid); None without data.

    ``before`` (``{patient: {label: Dice}}``, see :func:`dice_before`) adds, left of each label's box,
    a grey box of the Dice before registration, each patient's pair joined by a line.
    """
    labels = label_columns(rows)
    ok = [row for row in rows if row.get("status") == "ok"]
    before = before or {}
    kept = []
    for label in labels:
        pairs = [(before.get(row["patient"], {}).get(label), v) for row in ok
                 if (v := _number(row.get(label))) is not None]
        if pairs:
            kept.append((label, [v for _, v in pairs], [(_number(b), v) for b, v in pairs if _number(b) is not None]))
    if not kept:
        return None
    with_before = any(pairs for _, _, pairs in kept)
    width = min(15.0, max(4.0, (1.2 if with_before else 0.8) * len(kept) + 1.5))
    figure = Figure(figsize=(width, 3.8), dpi=90)
    FigureCanvasAgg(figure)
    axis = figure.add_subplot()
    shown = []
    for position, (_, after, pairs) in enumerate(kept, start=1):
        spread = np.linspace(-0.08, 0.08, len(after)) if len(after) > 1 else np.zeros(1)
        if pairs:
            old = [b for b, _ in pairs]
            axis.boxplot([old], positions=[position - 0.2], widths=0.3, showfliers=False,
                         boxprops={"color": "0.5"}, medianprops={"color": "0.3"}, whiskerprops={"color": "0.5"},
                         capprops={"color": "0.5"})
            offsets = spread[:len(pairs)] if len(pairs) == len(after) else np.zeros(len(pairs))
            for (b, a), offset in zip(pairs, offsets):
                axis.plot([position - 0.2 + offset, position + 0.2 + offset], [b, a], "-", color="0.75", lw=0.8)
            axis.plot(position - 0.2 + offsets, old, "o", color="0.45", alpha=0.7, markersize=3.5)
            shown += old
        centre = position + 0.2 if pairs else position
        axis.boxplot([after], positions=[centre], widths=0.3 if pairs else 0.5, showfliers=False)
        axis.plot(centre + spread, after, "o", color="tab:blue", alpha=0.8, markersize=4)
        shown += after
    axis.set_xticks(range(1, len(kept) + 1), [label for label, _, _ in kept], rotation=45, ha="right", fontsize=8)
    axis.set_xlim(0.4, len(kept) + 0.6)
    axis.set_ylabel("Dice")
    axis.set_ylim(*dice_axis_limits(shown))
    axis.grid(axis="y", alpha=0.3)
    if with_before:
        from matplotlib.lines import Line2D

        handles = [Line2D([], [], marker="o", color=colour, ls="") for colour in ("0.45", "tab:blue")]
        axis.legend(handles, ["before (headers only)", "after registration"], fontsize=8, loc="lower left",
                    bbox_to_anchor=(0.0, 1.0), ncol=2, frameon=False)
    figure.tight_layout()
    buffer = BytesIO()
    figure.savefig(buffer, format="png", metadata={"Software": None})
    return buffer.getvalue()


def _cell(value, digits: str) -> str:
    number = _number(value)
    return f"<td>{number:{digits}}</td>" if number is not None else f'<td class="text">{_escape(value or "")}</td>'


def _patient_table(rows: list[dict], before: dict[str, dict[str, float]]) -> str:
    """One row per patient, the same few columns whatever the number of labels."""
    columns = [c for c in PATIENT_COLUMNS if c != "mean_dice_before" or before]
    header = "".join(f"<th>{_escape(PATIENT_COLUMNS[c])}</th>" for c in columns) + "<th>notes</th>"
    body = []
    for row in rows:
        failed = row.get("status") != "ok"
        cells = []
        for column in columns:
            if column == "patient":
                cells.append(f'<td class="text">{_escape(row["patient"])}</td>')
            elif column == "status":
                cells.append(f'<td class="text status">{"FAILED" if failed else "ok"}</td>')
            elif column == "mean_dice_before":
                found = [v for v in before.get(row["patient"], {}).values() if _number(v) is not None]
                cells.append(_cell(np.mean(found) if found and not failed else "", _FORMATS[column]))
            else:
                cells.append(_cell(row.get(column, ""), _FORMATS[column]))
        notes = row.get("error") if failed else row.get("missing_labels")
        cells.append(f'<td class="text">{_escape(notes or "")}</td>')
        body.append(f'<tr class="{"failed" if failed else "ok"}" data-patient="{_escape(row["patient"])}">'
                    + "".join(cells) + "</tr>")
    return f'<table id="dice-table"><thead><tr>{header}</tr></thead><tbody>{"".join(body)}</tbody></table>'


def _label_tables(rows: list[dict], labels: list[str], before: dict[str, dict[str, float]]) -> list[str]:
    """Dice per patient and label, :data:`LABELS_PER_TABLE` labels a table; before registration in grey."""
    ok = [row for row in rows if row.get("status") == "ok"]
    tables = []
    for first in range(0, len(labels), LABELS_PER_TABLE):
        chunk = labels[first:first + LABELS_PER_TABLE]
        header = '<th class="patient">patient</th>' + "".join(f"<th>{_escape(label)}</th>" for label in chunk)
        body = []
        for row in ok:
            cells = [f'<td class="text">{_escape(row["patient"])}</td>']
            for label in chunk:
                after, old = _number(row.get(label)), _number(before.get(row["patient"], {}).get(label))
                text = "" if after is None else f"{after:.3f}"
                if old is not None:
                    text += f'<br><span class="before">{old:.3f}</span>'
                cells.append(f"<td>{text}</td>")
            body.append("<tr>" + "".join(cells) + "</tr>")
        wide = " wide" if len(chunk) > LABELS_PER_TABLE // 2 else ""  # a few labels keep their natural width
        tables.append(f'<table class="labels{wide}"><thead><tr>{header}</tr></thead>'
                      f'<tbody>{"".join(body)}</tbody></table>')
    return tables


def dice_before(manifest, out_dir, rows: list[dict]) -> dict[str, dict[str, float]]:
    """Each registered patient's Dice per label before registration, ``{patient: {label name: Dice}}``.

    The moving labels on the fixed grid through the images' headers alone (the QC figure's
    "before"), within the manifest's ``fixed_mask`` where it names one, for the labels of the
    patient's ``<out_dir>/<patient>/dice.csv``.  The labels of a row of DICOM series are its
    RTSTRUCTs', rasterised on their series as the study did (:func:`dicom_labels`).  Patients whose
    files cannot be read are left out.
    """
    from ..evaluation import metrics
    from .qc import labels_before

    entries = {entry["patient"]: entry for entry in io.read_manifest(manifest, check_files=False)}
    found = {}
    for row in rows:
        entry, table = entries.get(row["patient"]), Path(out_dir) / row["patient"] / "dice.csv"
        if row.get("status") != "ok" or not entry or not table.is_file():
            continue
        try:
            if entry.get("moving_rtstruct") and entry.get("fixed_rtstruct"):
                (moving, moving_affine), (fixed, affine) = dicom_labels(entry)
            elif entry.get("moving_labels") and entry.get("fixed_labels"):
                fixed, affine = io.load_labels(entry["fixed_labels"])
                moving, moving_affine = io.load_labels(entry["moving_labels"])
            else:
                continue
            mask = (io.load_mask(entry["fixed_mask"], fixed.shape, affine, reference=entry["fixed"])
                    if entry.get("fixed_mask") else None)
        except io.InputError:
            continue
        with open(table, newline="") as handle:
            named = {int(label["label"]): label["name"] for label in csv.DictReader(handle)}
        scores = metrics.dice_scores(labels_before(moving, moving_affine, fixed.shape, affine), fixed,
                                     list(named), mask)
        found[row["patient"]] = {name: round(float(score), 4) for name, score in zip(named.values(), scores)
                                 if not math.isnan(score)}
    return found


def dicom_labels(entry: dict) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """A manifest row of DICOM series: its moving and fixed RTSTRUCTs as label maps with their series'
    affines, the fixed ROIs numbered by name as the moving ones (as the study's ``RTStructToLabels``)."""
    from ..io import dicom

    moving_series, fixed_series = dicom.read_series(entry["moving"]), dicom.read_series(entry["fixed"])
    structures = dicom.read_rtstruct(entry["moving_rtstruct"], moving_series)
    reference = dicom.match_rois(dicom.read_rtstruct(entry["fixed_rtstruct"], fixed_series), structures.rois,
                                 entry["fixed_rtstruct"])
    return (structures.labels, moving_series.affine), (reference.labels, fixed_series.affine)


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


def provenance(finished: float | None = None) -> dict[str, str]:
    """By which command, with which Python and libraries (:func:`versions`) a study ran, and when its last
    result was written (``finished``, seconds since the epoch): a cached rerun of the same command finds
    the same provenance, and leaves the report as it was."""
    items = {"results written": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(finished))} if finished else {}
    return {**items, "command": shlex.join(sys.argv),
            "python": f"{platform.python_version()} ({platform.python_implementation()})",
            "machine": f"{platform.system()} {platform.machine()}", **versions()}


def _provenance_table(items: dict[str, str]) -> str:
    rows = "".join(f'<tr><td class="text">{_escape(name)}</td><td class="text">{_escape(value)}</td></tr>'
                   for name, value in items.items())
    return f'<table id="provenance"><thead><tr><th>item</th><th>value</th></tr></thead><tbody>{rows}</tbody></table>'


def study_report_html(rows: list[dict], *, figures: dict[str, dict[str, str]] | None = None,
                      parameters: dict | None = None, title: str = "INR-LDDMM study",
                      before: dict[str, dict[str, float]] | None = None, finished: float | None = None) -> str:
    """The report page as a string.

    Parameters
    ----------
    rows : the study table (:func:`nipype_inrlddmm.workflows.run_study`'s
        rows, or ``study_dice.csv`` read with :class:`csv.DictReader`).
    figures : ``{patient: {caption: relative URL}}``, shown in table order.
    parameters : ``{stage: {parameter: value}}`` (or ``{name: value}``).
    before : ``{patient: {label: Dice}}`` before registration (:func:`dice_before`), shown beside
        the Dice after it in the tables and the plot.
    finished : when the last result was written (seconds since the epoch), for :func:`provenance`.
    """
    figures, before = figures or {}, before or {}
    labels = label_columns([row for row in rows if row.get("status") == "ok"] or rows)
    ok = [row for row in rows if row.get("status") == "ok"]
    means = [m for row in ok if (m := _number(row.get("mean_dice"))) is not None]
    summary = (f"{len(rows)} patients: {len(ok)} registered, {len(rows) - len(ok)} failed"
               + (f"; mean Dice over patients {np.mean(means):.3f} (min {min(means):.3f}, max {max(means):.3f})"
                  if means else ""))
    parts = [
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">', f"<title>{_escape(title)}</title>",
        f"<style>{_STYLE}</style><script>{_SCRIPT}</script></head><body>",
        f"<h1>{_escape(title)}</h1>", f'<p id="summary">{_escape(summary)}</p>',
        "<h2>Patients</h2>", _patient_table(rows, before),
    ]
    if labels and ok:
        parts.append("<h2>Dice per patient and label</h2>"
                     + ('<p>After registration; <span class="before">before it (headers only)</span> below.</p>'
                        if before else ""))
        parts += _label_tables(rows, labels, before)
    plot = dice_boxplot(rows, before)
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
              "<h2>Provenance</h2>", _provenance_table(provenance(finished)), "</body></html>"]
    return "\n".join(parts) + "\n"


def write_study_report(out_dir, rows: list[dict], *, parameters: dict | None = None,
                       title: str = "INR-LDDMM study", before: dict[str, dict[str, float]] | None = None,
                       manifest=None) -> Path:
    """Write ``out_dir/report.html`` for a study whose results are in ``out_dir``.

    Links every ``<out_dir>/<patient>/qc.png`` and ``trajectory.gif`` that
    exists.  The Dice before registration is ``before`` when given, else
    read from the study's ``manifest`` (:func:`dice_before`) when given.
    Written atomically, and only when the content changed.
    """
    out_dir = Path(out_dir)
    path = out_dir / REPORT_NAME
    figures = {}
    for row in rows:
        found = {caption: f"{row['patient']}/{name}" for name, caption in PATIENT_FIGURES.items()
                 if (out_dir / row["patient"] / name).is_file()}
        if found:
            figures[row["patient"]] = found
    if before is None and manifest is not None:
        before = dice_before(manifest, out_dir, rows)
    results = [out_dir / row["patient"] / "dice.csv" for row in rows]
    finished = max((path.stat().st_mtime for path in results if path.is_file()), default=None)
    text = study_report_html(rows, figures=figures, parameters=parameters, title=title, before=before,
                             finished=finished)
    if path.is_file() and path.read_text(encoding="utf-8") == text:
        return path
    with io.atomic_path(path) as temporary:
        Path(temporary).write_text(text, encoding="utf-8")
    return path

