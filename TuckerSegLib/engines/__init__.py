"""Inference engines: run a (compressed) network as fast as the hardware allows.

``prepare_network(network, patch_size, in_channels, device, engine, precision, cache_dir)``
returns ``(module, EngineInfo)``; the module takes nnU-Net's place as ``predictor.network``.
See ``select`` for how engines and precisions are chosen.
"""
from TuckerSegLib.engines.base import ENGINE_CHOICES, PRECISION_CHOICES, PRECISIONS, EngineInfo
from TuckerSegLib.engines.prepare import prepare_network

__all__ = ["prepare_network", "EngineInfo", "ENGINE_CHOICES", "PRECISION_CHOICES", "PRECISIONS"]
