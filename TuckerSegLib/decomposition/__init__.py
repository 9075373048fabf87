"""Tensor math: Tucker-2 factorisation of convolution kernels (no networks, no rank policies)."""
from TuckerSegLib.decomposition.tucker import ModeSpectra, Tucker2, mode_spectra, tucker2

__all__ = ["ModeSpectra", "Tucker2", "mode_spectra", "tucker2"]
