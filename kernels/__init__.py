"""Triton kernels, each beside its plain-torch reference (docs/architecture.md §1).

Empty until the GPU fast-path issue: the CPU path uses the plain-torch layers in actserve.server.layers,
which are also the references those kernels will be tested against.
"""
