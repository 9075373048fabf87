"""The warm worker's messages (JSON, one per line).

Requests, on the worker's stdin::

    {"id": "r1", "command": "segment", "args": ["-i", "ct.nii.gz", "-o", "seg.nii.gz", "--fast"]}
    {"cancel": "r1"}          stop that request (queued or running); the worker stays up
    {"command": "quit"}       finish the running request, then exit (so does the end of stdin)

``args`` are exactly ``tuckerseg segment``'s arguments. Replies, on stdout, are
``TuckerSegLib.progress`` event lines (``TUCKERSEG_EVENT {...}``): one ``ready`` event when the
worker can take requests, then per request its ``stage``/``progress``/``log`` events, a ``result``
or an ``error`` (the same one line the command line prints), and last ``done`` with the exit code
the command line would have returned. Every request event carries ``"request": id``.
"""
from __future__ import annotations

import json
from typing import List, Optional

COMMANDS = ("segment",)  # what a request may run
READY, DONE = "ready", "done"


def segment_request(request_id: str, args: List[str]) -> str:
    """One request line."""
    return json.dumps({"id": str(request_id), "command": "segment", "args": [str(a) for a in args]})


def cancel_request(request_id: str) -> str:
    return json.dumps({"cancel": str(request_id)})


def quit_request() -> str:
    return json.dumps({"command": "quit"})


def parse_request(line: str) -> Optional[dict]:
    """A request dict, or None for a blank line; raises ValueError with one line when malformed."""
    line = line.strip()
    if not line:
        return None
    try:
        message = json.loads(line)
    except json.JSONDecodeError as exc:
        raise ValueError(f"not a JSON request: {exc.msg}") from None
    if not isinstance(message, dict):
        raise ValueError("a request must be a JSON object")
    if "cancel" in message:
        return {"cancel": str(message["cancel"])}
    command = message.get("command")
    if command == "quit":
        return {"command": "quit"}
    if command not in COMMANDS:
        raise ValueError(f"unknown command {command!r}; the worker runs {', '.join(COMMANDS)}")
    args = message.get("args", [])
    if not isinstance(args, list) or not all(isinstance(a, (str, int, float)) for a in args):
        raise ValueError("args must be a list of command-line arguments")
    if "id" not in message:
        raise ValueError("a request needs an id")
    return {"id": str(message["id"]), "command": command, "args": [str(a) for a in args]}
