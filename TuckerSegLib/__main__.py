"""``python -m TuckerSegLib`` is the ``tuckerseg`` command (used by the Slicer module's worker process)."""
from TuckerSegLib.cli.main import console_main

console_main()
