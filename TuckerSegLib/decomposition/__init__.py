"""Tensor math: Tucker-2 factorisation of convolution kernels and the choice of ranks."""
from TuckerSegLib.decomposition.tucker import ModeSpectra, Tucker2, mode_spectra, tucker2
from TuckerSegLib.decomposition.ranks import POLICIES, LayerShape, choose_ranks

__all__ = ["ModeSpectra", "Tucker2", "mode_spectra", "tucker2", "POLICIES", "LayerShape", "choose_ranks"]
