"""The optional compiled backend of the SIREN velocity network, and its Python side.

``_siren.c`` runs the whole network and its Euler flow fused over tiles of
points, forwards and backwards, on CPUs with AVX-512F (:mod:`.siren`);
``_sincos.c`` gives the layer-by-layer path its sine and cosine in one pass
(:mod:`.sine`); both take their sine from ``_sine_poly.h``.  Both
extensions are optional: where one is not built, or the CPU lacks what it
needs, the engine's velocity network runs through PyTorch alone, the
portable path both are tested against.  These modules know nothing of the
engine above them.
"""
