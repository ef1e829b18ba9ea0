"""INR-LDDMM deformable image registration for Nipype.

``from nipype_inrlddmm import register`` runs the whole coarse-to-fine
registration on two images; ``nipype_inrlddmm.engine`` holds the PyTorch
stages.
"""

__version__ = "0.1.0"

__all__ = ["Registration", "register", "__version__"]


def __getattr__(name: str):
    # Imported on first use (PEP 562): the command line parses its arguments before torch is loaded.
    if name in ("Registration", "register"):
        from . import api

        return getattr(api, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
