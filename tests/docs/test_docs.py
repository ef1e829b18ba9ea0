"""The README stays short and free of run history, and CI runs what the README says it runs."""

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
#: A session's history: issue numbers, commit hashes, dates of runs.
HISTORY = re.compile(r"issue[ -][0-9]|(?<![.\w])[0-9a-f]{7,40}\b|20[0-9]{2}-[01][0-9]-[0-3][0-9]")


def _history(text: str) -> list[str]:
    """Hits of :data:`HISTORY`.  A commit hash mixes digits with letters a-f (with more than the e and f
    of a float literal such as ``1e-7f``); digits alone are a number."""
    hits = []
    for match in HISTORY.finditer(text):
        token = match.group(0)
        if re.fullmatch(r"[0-9a-f]+", token) and not (re.search(r"[0-9]", token) and re.search(r"[a-d]", token)):
            continue
        hits.append(token)
    return hits


def test_readme_is_short_and_has_no_history():
    text = (REPO / "README.md").read_text(encoding="utf-8")
    assert len(text.encode()) <= 15000, len(text.encode())
    assert _history(text) == []


def test_code_comments_and_docs_have_no_history():
    files = [REPO / "setup.py", *(REPO / "nipype_inrlddmm").rglob("*.py"), *(REPO / "nipype_inrlddmm").rglob("*.c"),
             *(REPO / "nipype_inrlddmm").rglob("*.h"), *(REPO / "docs").glob("*.md"), *(REPO / "docs").glob("*.rst")]
    found = {str(path.relative_to(REPO)): hits for path in files
             if (hits := _history(path.read_text(encoding="utf-8")))}
    assert found == {}


def test_ci_runs_the_readme_test_command_and_the_docs():
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    ci = (REPO / ".ci" / "run").read_text()
    commands = [line.strip() for line in ci.splitlines() if line.strip() and not line.startswith("#")]
    assert "make test" in commands and "make docs" in commands
    assert re.search(r"^make test\b", readme, re.M)  # the README's test command is CI's
    assert "-W" in (REPO / "Makefile").read_text()  # make docs treats warnings as errors
