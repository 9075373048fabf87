"""``python -m TuckerSegLib`` is the ``tuckerseg`` command (used by the Slicer module's worker process)."""
import sys

from TuckerSegLib.cli.main import main

sys.exit(main())
