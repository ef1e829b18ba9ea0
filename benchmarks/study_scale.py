"""A study of many patients: every one finished, what Nipype costs per node, and a report that still opens.

    python benchmarks/study_scale.py [--patients 100] [--plugins MultiProc SLURM] [--threads 2] [--out scale.md]
    scripts/with-local-slurm.sh .venv/bin/python benchmarks/study_scale.py    # SLURM: the local cluster

One phantom cohort (``--shape``, default 48 x 40 x 20) is registered by
``inrlddmm study`` with each plugin in turn, package defaults, one torch
thread per node (``end_to_end.run_study``: the wall time from the command's
start to its exit, split into start-up, the nodes' own run time, Nipype's
own overhead around them, and the report and exit).  The SLURM plugin runs
where ``SLURM_CONF`` (else the running local cluster of
``scripts/local-slurm.sh``) names a cluster that answers ``sinfo``, and is
skipped, saying why, elsewhere.  Then each study's ``report.html`` is opened in
headless Chromium: the seconds to load it, whether the summary comes before
the patient table, one table row per patient, and the page's size.
"""

from __future__ import annotations

import argparse
import csv
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from end_to_end import run_study, write_results

from nipype_inrlddmm import __version__

LOCAL_SLURM = Path(__file__).resolve().parents[1] / "scripts" / "local-slurm.sh"
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"]


def slurm_unavailable(env: dict) -> str | None:
    """Why the SLURM plugin cannot run here, or None when a cluster answers.  Without ``SLURM_CONF`` in
    ``env``, the local cluster of ``scripts/local-slurm.sh`` is used when it runs (its SLURM_CONF is added)."""
    if not shutil.which("sbatch"):
        return "sbatch is not installed"
    if "SLURM_CONF" not in env:
        status = subprocess.run(["bash", str(LOCAL_SLURM), "status"], capture_output=True, text=True)
        for line in status.stdout.splitlines():
            if line.startswith("export SLURM_CONF="):
                env["SLURM_CONF"] = line.split("=", 1)[1]
    answer = subprocess.run(["sinfo", "-h"], capture_output=True, text=True, env=env)
    return None if answer.returncode == 0 else f"sinfo failed: {' '.join(answer.stderr.split())[:200]}"


def open_report(report: Path, patients: int) -> dict:
    """Load ``report`` in headless Chromium: its load time and whether it reads well at this size."""
    binary = shutil.which("chromium") or shutil.which("chromium-browser")
    size = {"report_mb": report.stat().st_size / 1e6}
    if not binary:
        return {**size, "chromium": "not installed"}
    start = time.perf_counter()
    dom = subprocess.run([binary, *CHROMIUM_FLAGS, "--dump-dom", report.resolve().as_uri()], capture_output=True,
                         text=True, timeout=300)
    seconds = time.perf_counter() - start
    text = dom.stdout
    rows = text.count('data-patient="')
    return {**size, "chromium_seconds": seconds, "patient_rows": rows,
            "summary_first": 0 <= text.find('id="summary"') < text.find("<table"),
            "opens": dom.returncode == 0 and rows >= patients}


def statuses(out: Path) -> dict[str, int]:
    with open(out / "study_dice.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    return {status: sum(row["status"] == status for row in rows) for status in ("ok", "failed")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--patients", type=int, default=100)
    parser.add_argument("--shape", type=int, nargs=3, default=(48, 40, 20), metavar=("X", "Y", "Z"))
    parser.add_argument("--plugins", nargs="+", default=["MultiProc", "SLURM"], choices=["MultiProc", "SLURM"])
    parser.add_argument("--threads", type=int, default=2, help="MultiProc workers (SLURM: the cluster's cores)")
    parser.add_argument("--out", type=Path, help="write the table here (and a .json beside it)")
    args = parser.parse_args()
    env = dict(os.environ, OMP_NUM_THREADS="1")
    header = (f"# inrlddmm study {__version__}: {args.patients} phantom patients of "
              f"{' x '.join(map(str, args.shape))}, {args.threads} cores, {time.strftime('%Y-%m-%d %H:%M')}\n")
    print(header, flush=True)
    head = ["plugin", "ok / failed", "nodes", "wall (s)", "in the nodes (s)", "Nipype per node (s)",
            "Nipype share (%)", "start-up (s)", "report and exit (s)", "report (MB)", "Chromium load (s)",
            "summary first", "rows"]
    lines, results = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)], {}
    with tempfile.TemporaryDirectory() as scratch:
        for plugin in args.plugins:
            reason = slurm_unavailable(env) if plugin == "SLURM" else None
            if reason:
                lines.append(f"| {plugin} | skipped: {reason} |" + " |" * (len(head) - 2))
                continue
            study = run_study(args.patients, Path(scratch), args.threads, env, plugin=plugin, shape=args.shape)
            out = Path(study["out"])
            study.update(statuses(out), **open_report(out / "report.html", args.patients))
            results[plugin] = study
            lines.append("| " + " | ".join([
                plugin, f"{study['ok']} / {study['failed']}", str(study["nodes"]), f"{study['wall']:.1f}",
                f"{study['node_seconds']:.1f}", f"{study['nipype'] * args.threads / study['nodes']:.2f}",
                f"{100 * study['nipype_share']:.1f}", f"{study['start_up']:.1f}", f"{study['report_and_exit']:.1f}",
                f"{study['report_mb']:.2f}", f"{study.get('chromium_seconds', float('nan')):.1f}",
                str(study.get("summary_first", "-")), str(study.get("patient_rows", "-"))]) + " |")
            print(lines[-1], flush=True)
    table = "\n".join(lines) + "\n"
    print(table)
    if args.out:
        write_results(args.out, header + "\n" + table, results)


if __name__ == "__main__":
    main()
