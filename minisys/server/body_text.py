"""Every string of a request body must be text: a lone surrogate is a 400 naming the field.

JSON may spell a lone UTF-16 surrogate (``"\\ud800"``): `json.loads` accepts
it and gives a Python ``str`` that UTF-8 cannot encode, so the tokenizer,
the chat template and even the JSON error response would fail on it (a
500). `check_body_text` finds the first such string in the parsed body,
keys included, and refuses it with FastAPI's validation error shape
(-> 400, ``param`` = the top-level field, the message the full path).

Invariant: a body that passes has only encodable strings, wherever they
are (prompt, message content, stop, model, user, and any field added
later). Cost: raw bytes cannot hold a surrogate (invalid UTF-8 is already a
JSON error), only a ``\\uD8xx``-``\\uDFxx`` escape can; bodies without one
are not walked at all.
"""
from __future__ import annotations

import re
from typing import Any, Optional

from fastapi.exceptions import RequestValidationError

from ..model.tokenizer import unencodable_at

_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")   # \ud800..\udfff, any case: the only way in


def first_unencodable(data: Any) -> Optional[tuple[tuple, str, int]]:
    """(path, string, index) of the first string (value or key) UTF-8 cannot encode, or None.

    Iterative (a depth-first walk with an explicit stack): `json.loads` allows
    nesting deeper than a recursive walk on a worker thread might.
    """
    stack: list[tuple[tuple, Any]] = [((), data)]
    while stack:
        path, item = stack.pop()
        if isinstance(item, str):
            i = unencodable_at(item)
            if i is not None:
                return path, item, i
        elif isinstance(item, dict):
            for key, value in reversed(list(item.items())):
                i = unencodable_at(key)
                if i is not None:
                    return (*path, key), key, i
                stack.append(((*path, key), value))
        elif isinstance(item, list):
            stack.extend(((*path, k), v) for k, v in reversed(list(enumerate(item))))
    return None


def _printable(part: Any) -> str:
    return part.encode("utf-8", "backslashreplace").decode("ascii", "replace") if isinstance(part, str) \
        else str(part)


def check_body_text(body: bytes, data: Any) -> None:
    """RequestValidationError (-> 400 naming the field) if any string of ``data`` (the parsed ``body``)
    is not encodable text."""
    if not _SURROGATE_ESCAPE.search(body):
        return
    found = first_unencodable(data)
    if found is None:
        return
    path, text, i = found
    raise RequestValidationError([{
        "type": "string_unicode", "loc": ("body", *(_printable(p) for p in path)),
        "msg": f"not valid text: a lone surrogate U+{ord(text[i]):04X} at character {i} (UTF-8 cannot encode it)",
        "input": None}])
