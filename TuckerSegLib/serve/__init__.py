"""A warm worker: ``tuckerseg serve`` keeps libraries, compressed networks and engines loaded
between segmentation requests, so that a second request pays neither imports nor model loading.

Why stdin/stdout and not a port: requests and progress travel only between the worker and the
process that started it (the Slicer module, a script), never over a network socket others could
reach. The protocol (``protocol``) is JSON lines: requests in, ``TuckerSegLib.progress`` event
lines out, each tagged with its request id. ``server`` runs the loop; ``client.ServeClient``
starts a worker and talks to it from Python (no torch import on the client side).
"""
from TuckerSegLib.serve.client import ServeClient, ServeReply

__all__ = ["ServeClient", "ServeReply"]
