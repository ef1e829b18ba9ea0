"""The set-up the interfaces' examples share, prepared once, as Nipype's own conftest does for its doctests.

What the examples find (an empty working folder, ``data`` and ``coarse``)
is said in the package docstring, which the documentation shows above them.
"""

import pytest

from nipype_inrlddmm.interfaces import CoarseINR
from nipype_inrlddmm.phantom import write_cohort


@pytest.fixture(scope="session", autouse=True)
def _phantom_patient(doctest_namespace, tmp_path_factory):
    # Once for all examples: writing the patient takes seconds, and the examples only read it.
    data = write_cohort(tmp_path_factory.mktemp("data"), 1, shape=(32, 28, 16)).parent / "p01"
    coarse = CoarseINR(moving_image=str(data / "ct.nii.gz"), fixed_image=str(data / "cbct.nii.gz"), iterations=5)
    doctest_namespace["data"] = data
    doctest_namespace["coarse"] = coarse.run(cwd=str(tmp_path_factory.mktemp("coarse"))).outputs


@pytest.fixture(autouse=True)
def _working_folder(tmp_path, monkeypatch):
    # Each example in a folder of its own, as each node has: no example reads what another wrote.
    monkeypatch.chdir(tmp_path)
