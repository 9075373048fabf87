"""Inference engines: run a (compressed) network as fast as the hardware allows.

``prepare_network(network, patch_size, in_channels, device, run, cache_dir)`` returns
``(module, EngineInfo)``; the module takes nnU-Net's place as ``predictor.network``. ``run`` is a
``specs.RunSpec`` (engine, precision, layer forms). See ``select`` for how engines and precisions
are chosen, ``layer_form_choice`` for the per-layer forms, ``timing`` for how both are measured.
"""
from TuckerSegLib.engines.base import EngineInfo
from TuckerSegLib.engines.prepare import prepare_network

__all__ = ["prepare_network", "EngineInfo"]
