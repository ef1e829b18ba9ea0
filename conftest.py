"""Hooks of the whole test run (the tests and the package's doctests alike).

Which code computes the velocity network depends on the CPU: the fused kernels need AVX-512F, and
elsewhere the tests that need them skip.  Two green runs can so have tested different code, and the
run's report says which.
"""


def pytest_terminal_summary(terminalreporter):
    from nipype_inrlddmm.engine.velocity import siren_path

    terminalreporter.write_sep("-", f"SIREN network: {siren_path()}")
