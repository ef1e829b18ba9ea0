"""How long ``inrlddmm register`` takes to exit once its last output is written: an ordinary exit against
:func:`nipype_inrlddmm.cli.run`'s, which runs the exit handlers and skips the interpreter's teardown.

Each run registers a phantom pair (128 x 112 x 48, few iterations: only the exit is timed) in its own
process, which prints the time at which the command returned; the exit is what passes from there to the
end of the process.  The two kinds alternate, so the machine's load falls on both alike::

    python benchmarks/exit_time.py --runs 3
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from nipype_inrlddmm.phantom import write_cohort

FEW = ["--coarse-iterations", "10", "--distill-iterations", "5", "--fine-iterations", "10", "--quiet"]

#: Registers, prints the time at which the command returned, then exits the ordinary way or as ``inrlddmm`` does.
DRIVER = """
import sys, time
import nipype_inrlddmm.cli as cli
kind, argv = sys.argv[1], sys.argv[2:]
if kind == "ordinary":
    code = cli.main(argv)
    print(time.time(), file=sys.stderr, flush=True)
    sys.exit(code)
command = cli.main
def timed():
    code = command(argv)
    print(time.time(), file=sys.stderr, flush=True)
    return code
cli.main = timed
cli.run()
"""


def exit_seconds(kind: str, argv: list[str]) -> float:
    done = subprocess.run([sys.executable, "-c", DRIVER, kind, *argv], capture_output=True, text=True)
    ended = time.time()
    if done.returncode != 0:
        raise RuntimeError(done.stderr)
    return ended - float(done.stderr.split()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3, help="runs of each kind")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        patient = write_cohort(Path(scratch) / "cohort", 1, shape=(128, 112, 48)).parent / "p01"
        seconds = {"ordinary": [], "inrlddmm": []}
        for run in range(args.runs):
            for kind in seconds:
                argv = ["register", "--moving", str(patient / "ct.nii.gz"), "--fixed", str(patient / "cbct.nii.gz"),
                        "--moving-labels", str(patient / "ct_labels.nii.gz"),
                        "--fixed-labels", str(patient / "cbct_labels.nii.gz"),
                        "--fixed-mask", str(patient / "cbct_fov.nii.gz"), "--num-threads", str(args.threads),
                        "--out-dir", str(Path(scratch) / f"{kind}{run}"), *FEW]
                seconds[kind].append(exit_seconds(kind, argv))
    for kind, values in seconds.items():
        print(f"{kind}: exit {statistics.median(values):.2f} s median, "
              f"{' / '.join(f'{v:.2f}' for v in values)} s")


if __name__ == "__main__":
    main()
