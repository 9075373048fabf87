"""Qt-free parts of the TuckerSeg Slicer module.

Everything here touches only MRML (``slicer`` from Slicer or from the ``slicer-core`` wheel),
files and child processes, so it runs and is tested with pytest outside Slicer. The widget in
``TuckerSeg.py`` stays thin and calls into these modules:

- ``structures``: the 117 TotalSegmentator ``total`` structure names (for the checklist);
- ``terminology``: names -> colour and Slicer ``TerminologyEntry`` from the SNOMED mapping;
- ``volume_io``: write the input volume to NIfTI, read the multilabel result back;
- ``segmentation_import``: multilabel result -> segments, built off-scene, committed on success;
- ``worker``: the child process (own process group), its protocol lines, cancel;
- ``run``: one segmentation run from input node to output node, sync or polled (async);
- ``cost_readout``: params / MACs / speed-up read-out for the ratio slider;
- ``dependencies``: which Python packages are missing in Slicer's Python and installing them.
"""
