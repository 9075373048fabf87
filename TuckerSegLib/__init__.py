"""TuckerSeg: TotalSegmentator with Tucker-2 compressed nnU-Net networks.

Layers, from the bottom up:

- ``decomposition``: tensor math (Tucker-2 of a conv kernel) and rank policies;
- ``network``: factorised conv modules, network surgery, params/MACs accounting;
- ``models``: nnU-Net model folders, TotalSegmentator weights, compressed-model files, the cache;
- ``engines``: PyTorch / OpenVINO execution of a (compressed) network;
- ``pipeline``: TotalSegmentator's own segmentation pipeline with compressed networks;
- ``evaluation``, ``finetune``, ``demo``: quality, recovery and the offline demo;
- ``cli``: the ``tuckerseg`` command; the Slicer module lives in ``TuckerSeg/``.
"""
__version__ = "0.1.0"


def segment(input, output, ratio: float = 0.5, **kwargs):
    """Segment a CT with compressed TotalSegmentator models; see ``TuckerSegLib.pipeline.segment``."""
    from TuckerSegLib.pipeline.segment import segment as _segment

    return _segment(input, output, ratio=ratio, **kwargs)


def batch(inputs, outdir, ratio: float = 0.5, **kwargs):
    """Segment many CTs on Ray, resumably; returns the results table. See ``TuckerSegLib.cohort.batch``."""
    from TuckerSegLib.cohort import batch as _batch

    return _batch(inputs, outdir, ratio=ratio, **kwargs)
