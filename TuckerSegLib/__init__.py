"""TuckerSeg: TotalSegmentator with Tucker-2 compressed nnU-Net networks.

Layers, from the bottom up (a module imports only from its own layer or those below):

- ``errors``, ``progress``, ``specs`` (options, validated once), ``storage`` (cache folders and
  safe writes), ``devices``, ``inputs`` (checked CT inputs);
- ``decomposition``: tensor math (Tucker-2 of a conv kernel);
- ``network``: factorised conv modules, network surgery, params/MACs and layer shapes;
- ``models``: nnU-Net model folders, checkpoints, TotalSegmentator weights, compressed-model files;
- ``compression``: the algorithm (rank policies, measured sensitivities and search, the data it
  measures on, ``compress_model``) and the cache of compressed models;
- ``engines``: PyTorch / OpenVINO execution of a (compressed) network;
- ``pipeline``: TotalSegmentator's own segmentation pipeline with compressed networks;
- ``evaluation``, ``finetune``, ``demo``: quality, recovery and the offline demo;
- ``cli`` and ``estimate``: the ``tuckerseg`` command and the Slicer panel's read-out; the Slicer
  module itself lives in ``TuckerSeg/``.
"""
__version__ = "0.1.0"


def segment(input, output, ratio=None, min_agreement=None, **kwargs):
    """Segment a CT with compressed TotalSegmentator models; see ``TuckerSegLib.pipeline.segment``.

    Each network is the cheapest whose validated agreement with the original is at least
    ``min_agreement`` (default 0.95), or, with ``ratio``, compressed at that ratio.
    Other options are ``segment``'s and TotalSegmentator's (``policy``, ``task``, ``fast``, ``fastest``,
    ``roi_subset``, ``ml``, ``device``, ``engine``, ``precision``, ``layer_forms``, ``cache_dir``,
    ``statistics``, ...); they are checked here and raise ``TuckerSegError`` with one line.
    """
    from TuckerSegLib.pipeline.segment import segment_api

    return segment_api(input, output, ratio=ratio, min_agreement=min_agreement, **kwargs)


def batch(inputs, outdir, ratio=None, min_agreement=None, **kwargs):
    """Segment many CTs on Ray, resumably; returns the results table. See ``TuckerSegLib.cohort.batch``."""
    from TuckerSegLib.cohort import batch as _batch

    return _batch(inputs, outdir, ratio=ratio, min_agreement=min_agreement, **kwargs)
