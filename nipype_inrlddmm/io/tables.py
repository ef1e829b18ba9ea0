"""Tables: CSV logs and label names, and a study's manifest with its one rule of columns."""

from __future__ import annotations

import csv
import json
from pathlib import Path

from .files import InputError, atomic_path


def write_csv(path, rows: list[dict], *, delimiter: str = ",") -> Path:
    """Write dict rows (keys of the first row, in order, as the header) atomically."""
    fieldnames = list(rows[0]) if rows else []
    for row in rows:
        fieldnames += [key for key in row if key not in fieldnames]
    with atomic_path(path) as temporary:
        with open(temporary, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=fieldnames, delimiter=delimiter)
            writer.writeheader()
            writer.writerows(rows)
    return Path(path)


def load_label_names(path) -> dict[int, str]:
    """Label names from a JSON object ``{"1": "body"}`` or a TSV/CSV with an id and a name column.

    The id column may be called ``index``, ``label``, ``id`` or ``label_id``.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "label-name file does not exist")
    text = path.read_text()
    if path.suffix == ".json":
        try:
            return {int(k): str(v) for k, v in json.loads(text).items()}
        except (ValueError, AttributeError) as error:
            raise InputError(path, f"expected a JSON object of id -> name ({error})") from error
    rows = list(csv.DictReader(text.splitlines(), delimiter="\t" if path.suffix == ".tsv" else ","))
    id_column = next((c for c in ("index", "label", "id", "label_id") if rows and c in rows[0]), None)
    if id_column is None or "name" not in rows[0]:
        raise InputError(path, "expected columns 'index' (or 'label'/'id') and 'name'")
    try:
        return {int(row[id_column]): row["name"] for row in rows}
    except ValueError as error:
        raise InputError(path, f"a label id is not an integer ({error})") from error


#: The file columns of a study manifest (paths relative to the manifest's folder, or absolute).  ``moving``
#: and ``fixed`` are NIfTI files, or folders each holding one DICOM series; the others are files.
MANIFEST_FILES = ("moving", "fixed", "moving_labels", "fixed_labels", "moving_rtstruct", "fixed_rtstruct",
                  "fixed_mask", "init_model")
#: The columns every manifest has.
MANIFEST_COLUMNS = ("patient", "moving", "fixed")
#: The one rule of the labels, which a study evaluates: every row fills one of these pairs of columns, label
#: maps or (with DICOM series) RTSTRUCTs, and the manifest has at least one of them.
MANIFEST_LABELS = (("moving_labels", "fixed_labels"), ("moving_rtstruct", "fixed_rtstruct"))


def _missing_columns(columns) -> list[str]:
    """The columns a manifest's header lacks: the required ones, and the label maps' when it has no label pair."""
    missing = [c for c in MANIFEST_COLUMNS if c not in columns]
    if not any(set(pair) <= set(columns) for pair in MANIFEST_LABELS):
        missing += [c for c in MANIFEST_LABELS[0] if c not in columns]
    return missing


def _row_labels_problem(row) -> str | None:
    """What is wrong with a manifest row's label columns (:data:`MANIFEST_LABELS`), or None."""
    filled = [pair for pair in MANIFEST_LABELS if any(row.get(column) for column in pair)]
    if len(filled) > 1:
        return "gives both label maps and RTSTRUCTs: give one pair"
    for column in (filled or MANIFEST_LABELS)[0]:
        if not row.get(column):
            return f"empty {column!r}"
    return None


def read_manifest(path, *, check_files: bool = True) -> list[dict]:
    """Rows of a study manifest (TSV or CSV) with paths made absolute.

    Columns (:data:`MANIFEST_FILES`): ``patient``, ``moving``, ``fixed``
    (NIfTI files or DICOM series folders), each non-empty on every row;
    labels on every row, ``moving_labels`` and ``fixed_labels`` (label
    maps) or ``moving_rtstruct`` and ``fixed_rtstruct`` (RTSTRUCTs drawn
    on the DICOM series); optionally ``fixed_mask`` and ``init_model`` (a
    previous registration's ``model.pt`` to start from; a row without one
    registers from scratch).  Relative paths are
    relative to the manifest's folder.  Patient ids must be unique, non-empty
    and usable as a folder name.  With ``check_files`` (the default) every
    referenced file (or folder) must exist; the error names the manifest's line, the
    patient and the column of each missing one.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "manifest does not exist")
    delimiter = "\t" if path.suffix == ".tsv" else ","
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as error:
        raise InputError(path, f"cannot read the manifest as UTF-8 text ({error})") from error
    reader = csv.DictReader(text.splitlines(), delimiter=delimiter)
    try:
        rows = [(reader.line_num, row) for row in reader]
    except csv.Error as error:
        raise InputError(path, f"cannot parse the manifest ({error})") from error
    columns = reader.fieldnames or []
    missing = _missing_columns(columns)
    if missing or not rows:
        separated = "tab" if delimiter == "\t" else "comma"
        needed = (*MANIFEST_COLUMNS, *MANIFEST_LABELS[0])
        raise InputError(path, f"manifest needs columns {needed} (or, for DICOM series, {MANIFEST_LABELS[1]} "
                         f"for the labels); "
                         + (f"missing {missing} (found {columns}, read as {separated}-separated)" if missing
                            else "it has no rows"))
    seen, absent = {}, []
    for line, row in rows:
        where = f"line {line}"
        if None in row:
            raise InputError(path, f"{where} has more fields than the header")
        patient = row["patient"] or ""
        if not patient.strip():
            raise InputError(path, f"{where}: empty patient id")
        if patient in (".", "..") or "/" in patient or "\\" in patient:
            raise InputError(path, f"{where}: patient id {patient!r} cannot be a folder name")
        if patient in seen:
            raise InputError(path, f"duplicate patient id {patient!r} (lines {seen[patient]} and {line})")
        seen[patient] = line
        for column in MANIFEST_COLUMNS[1:]:
            if not row[column]:
                raise InputError(path, f"{where} (patient {patient!r}): empty {column!r}")
        problem = _row_labels_problem(row)
        if problem:
            raise InputError(path, f"{where} (patient {patient!r}): {problem}")
        for column in MANIFEST_FILES:
            if row.get(column):
                row[column] = str((path.parent / row[column]).resolve())
                found = Path(row[column]).exists() if column in ("moving", "fixed") else Path(row[column]).is_file()
                if check_files and not found:
                    absent.append(f"{where} (patient {patient!r}), column {column!r}: {row[column]}")
    if absent:
        shown = "; ".join(absent[:10]) + (f"; and {len(absent) - 10} more" if len(absent) > 10 else "")
        raise InputError(path, f"{len(absent)} referenced file(s) do not exist: {shown}")
    return [row for _, row in rows]


def check_image_kinds(manifest, patient: str, row: dict) -> None:
    """Refuse a manifest row (of ``patient``) whose images are not of the kind its labels need, naming both.

    RTSTRUCTs come with DICOM series folders, label maps with NIfTI files.  Read from the file system: a
    study checks it in the patient's own node, so another patient's missing file is not this one's error.
    """
    dicom = bool(row.get("moving_rtstruct"))
    for column in ("moving", "fixed"):
        if Path(row[column]).is_dir() != dicom:
            need = ("a folder holding one DICOM series (the RTSTRUCTs are drawn on it)" if dicom else
                    "a NIfTI file (a DICOM series takes its labels as moving_rtstruct and fixed_rtstruct)")
            raise InputError(row[column], f"the {column} image of patient {patient!r} must be {need} "
                             f"(manifest {manifest}, column {column!r})")
