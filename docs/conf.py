"""Sphinx configuration of the nipype_inrlddmm documentation (``make docs``).

The interface reference is generated from the traits by Nipype's own ``nipype.sphinxext.apidoc``,
the workflow graphs are drawn by Nipype's ``write_graph`` through ``nipype.sphinxext.plot_workflow``
(Graphviz ``dot``), and the command-line reference comes from the ``inrlddmm`` argparse parser
(docs/_ext/cliref.py).  The build needs no network, no GPU and no data.
"""

import os
import sys
from pathlib import Path

os.environ.setdefault("NIPYPE_NO_ET", "1")  # no network version check when interfaces are created
os.environ.setdefault("MPLBACKEND", "Agg")
sys.path.insert(0, str(Path(__file__).resolve().parent / "_ext"))  # cliref

import nipype_inrlddmm  # noqa: E402

project = "nipype_inrlddmm"
author = "nipype_inrlddmm developers"
copyright = "nipype_inrlddmm developers"
version = release = nipype_inrlddmm.__version__

extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "sphinx.ext.mathjax",
    "sphinx.ext.intersphinx",
    "nipype.sphinxext.apidoc",
    "nipype.sphinxext.plot_workflow",
    "cliref",
]

source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
exclude_patterns = ["_build", "Thumbs.db", ".DS_Store"]
myst_enable_extensions = ["dollarmath", "amsmath", "colon_fence"]
myst_heading_anchors = 3

# Autodoc: members in source order, type hints in the signature; numpy-style docstrings (napoleon,
# through nipype.sphinxext.apidoc, which also appends every interface's input and output traits).
autodoc_member_order = "bysource"
autodoc_typehints = "signature"
autodoc_default_options = {"members": False}
napoleon_numpy_docstring = True
napoleon_google_docstring = False
napoleon_use_rtype = False

# Workflow graphs: Nipype's write_graph, PNG, the code that built them folded under each graph.
workflow_include_source = False
plot_formats = [("png", 90)]
plot_html_show_formats = False
plot_html_show_source_link = False

# Links to other projects resolve offline: no inventories are fetched.
intersphinx_mapping = {}

html_theme = "furo"
html_title = f"nipype_inrlddmm {release}"
html_static_path = ["_static"]
html_show_sourcelink = False
