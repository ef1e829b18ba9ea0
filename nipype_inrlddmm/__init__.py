"""INR-LDDMM deformable image registration for Nipype.

``from nipype_inrlddmm import register`` runs the whole coarse-to-fine
registration on two images; ``nipype_inrlddmm.engine`` holds the pure-PyTorch
stages.
"""

__version__ = "0.1.0"

from .api import Registration, register  # noqa: E402

__all__ = ["Registration", "register", "__version__"]
