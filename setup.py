"""nipype_inrlddmm: INR-LDDMM deformable image registration for Nipype.

Install torch first (``pip install torch==2.13.0``, a CPU wheel): the range
below accepts it, so pip does not fetch a CUDA build.
"""

from setuptools import Extension, find_packages, setup

# -ffp-contract=off: the compiler fuses no multiplication and addition the source does not.
C_FLAGS = ["-O3", "-ffp-contract=off", "-fno-math-errno", "-fno-trapping-math", "-fopenmp"]
# The sine and cosine both extensions include: a change rebuilds both, and sdists carry it.
SINE_POLY = ["nipype_inrlddmm/kernels/_sine_poly.h"]

setup(
    name="nipype_inrlddmm",
    version="0.1.0",
    description="INR-LDDMM deformable image registration (implicit neural velocity fields) for Nipype",
    long_description=open("README.md").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["nipype_inrlddmm", "nipype_inrlddmm.*"]),
    # The fused sine-cosine of the SIREN layers' layer-by-layer path (kernels/sine.py): one pass gives
    # both, where torch.sin and torch.cos take one each.  Optional: without a C compiler the package
    # installs anyway and the layers use torch.sin and torch.cos, somewhat slower (docs/decisions.md).
    ext_modules=[
        Extension(
            "nipype_inrlddmm.kernels._sincos",
            ["nipype_inrlddmm/kernels/_sincos.c"],
            depends=SINE_POLY,
            extra_compile_args=C_FLAGS,
            extra_link_args=["-fopenmp"],
            optional=True,
        ),
        # The whole SIREN velocity network and its Euler flow fused over tiles of points (kernels/siren.py),
        # on CPUs with AVX-512F, where it runs the network's work in about half the time of the
        # layer-by-layer path (docs/decisions.md).  Optional as the one above: without it (or on other
        # CPUs) the layers run one by one through PyTorch.
        Extension(
            "nipype_inrlddmm.kernels._siren",
            ["nipype_inrlddmm/kernels/_siren.c"],
            depends=SINE_POLY,
            extra_compile_args=C_FLAGS,
            extra_link_args=["-fopenmp"],
            optional=True,
        ),
    ],
    install_requires=[
        "torch>=2.1",
        "nipype>=1.8",
        "nibabel>=5",
        "numpy>=1.24",
        "scipy>=1.10",
        "traits>=6.4",
        "networkx>=3",
        "tqdm>=4.60",
        "matplotlib>=3.7",
        # DICOM in and out (nipype_inrlddmm.io.dicom): pydicom reads and writes the files; scikit-image turns
        # contours into voxels and back.  Not rt-utils: it needs OpenCV (with libGL) and places pixels wrongly
        # on images with non-square pixels or rows and columns of different counts; the tests use it only to read
        # back what we write, as another program would.
        "pydicom>=3.0",
        "scikit-image>=0.22",
    ],
    extras_require={
        "tests": ["pytest>=7", "hypothesis>=6", "nitransforms>=23", "rt-utils>=1.2"],
        # ANTs SyN (accuracy.py, end_to_end.py) and FireANTs, the GPU peer (gpu.py); FireANTs needs torch, which
        # is installed first as above, so pip keeps the one present.
        "benchmarks": ["antspyx>=0.4", "fireants>=1.5"],
        # `make docs`: Sphinx with the furo theme, Markdown pages through myst-parser; the interface
        # reference and workflow graphs come from nipype.sphinxext (Graphviz's dot for the graphs).
        "docs": ["sphinx>=8", "furo>=2024.8.6", "myst-parser>=4"],
    },
    entry_points={"console_scripts": ["inrlddmm = nipype_inrlddmm.cli:run"]},
)
