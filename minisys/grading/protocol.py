"""The messages a test child sends the grader: JSON lines, each with an HMAC.

The grader (:mod:`minisys.grading.runner`) starts each test child with two
inherited pipes: it writes a fresh random key into one and closes it; the
child's plugin (:mod:`minisys.grading.collector`) reads the key in
``pytest_configure`` -- before any student code is loaded -- closes that pipe
and signs every message it writes into the other one. The key is never in the
environment, the command line or a file.

Messages, in the order the grader accepts them::

    {"kind": "manifest", "tests": [...], "errors": [...]}   once, at collection end
    {"kind": "loading"} / {"kind": "loaded"}                 around the notebook's cells
    {"kind": "start", "nodeid": N}                           a test begins
    {"kind": "result", "nodeid": N, "outcome": ..., ...}     the same test ends
    {"kind": "done"}                                         the session ends

What the MAC buys, and what it does not: a line that a student's code writes
into an inherited descriptor, or a file written instead of the pipe, is not
accepted. Code that runs inside the child can still reach the plugin's signer
(Python has no in-process boundary), so the grader never trusts the child
further than the protocol's order: one result per started test, nothing after
``done``, nothing for a test that is not in the manifest (see ``runner``).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets

KEY_BYTES = 32


def new_key() -> bytes:
    return secrets.token_bytes(KEY_BYTES)


def _mac(key: bytes, body: str) -> str:
    return hmac.new(key, body.encode("utf-8"), hashlib.sha256).hexdigest()


def encode(key: bytes, message: dict) -> bytes:
    """One signed line: ``{"body": "<json>", "mac": "<hex>"}\\n``."""
    body = json.dumps(message, sort_keys=True)
    return (json.dumps({"body": body, "mac": _mac(key, body)}) + "\n").encode("utf-8")


def decode(key: bytes, line: bytes) -> dict | None:
    """The message of a line whose MAC verifies, else ``None`` (the line is ignored)."""
    try:
        outer = json.loads(line)
        body, mac = outer["body"], outer["mac"]
        if not (isinstance(body, str) and isinstance(mac, str)):
            return None
        if not hmac.compare_digest(_mac(key, body), mac):
            return None
        message = json.loads(body)
    except (ValueError, KeyError, TypeError):
        return None
    return message if isinstance(message, dict) else None


def read_key(fd: int) -> bytes:
    """Read the key the grader wrote into ``fd`` and close it."""
    with os.fdopen(fd, "rb") as pipe:
        key = pipe.read(KEY_BYTES)
    if len(key) != KEY_BYTES:
        raise RuntimeError("the grader's key pipe was short")
    return key
