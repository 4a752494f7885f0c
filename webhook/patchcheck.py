"""Prove that a JSON patch of `add`/`replace` operations applies, without copying the document.

The mutating webhook never sends a patch it has not applied itself: a patch the apiserver cannot apply
fails the pod even under `failurePolicy: Ignore`. Applying with a full deep copy of the pod (JSON round
trip + jsonpatch, which also deep-copies every value) was 2/3 of mutate()'s time, so this applier
copies only the containers on each operation's path (copy-on-write) and shares everything else.

It is deliberately strict (RFC 6902 §4.1/§4.3 + RFC 6901): every parent must exist, `replace` needs an
existing target, array indices are canonical decimals in range (`-` only to append), `~` escapes are
`~0`/`~1` only, and any other operation is refused. So whatever it accepts, the apiserver's applier
accepts too. tests/webhook/test_patchcheck.py cross-checks it against jsonpatch.
"""
from __future__ import annotations

from typing import Any, Sequence

SUPPORTED_OPS = ("add", "replace")


class PatchError(ValueError):
    """The patch does not apply; the message says which operation and why."""


def _tokens(path: Any) -> list[str]:
    if not isinstance(path, str):
        raise PatchError(f"path {path!r} is not a string")
    if path == "":
        return []
    if not path.startswith("/"):
        raise PatchError(f"path {path!r} does not start with '/'")
    tokens = []
    for raw in path[1:].split("/"):
        # After removing valid escapes no `~` may remain (RFC 6901 §3: only ~0 and ~1 exist).
        if "~" in raw.replace("~0", "").replace("~1", ""):
            raise PatchError(f"path {path!r} has an invalid '~' escape")
        tokens.append(raw.replace("~1", "/").replace("~0", "~"))
    return tokens


def _array_index(token: str, length: int, allow_end: bool) -> int:
    """The list position `token` names; `allow_end` admits len (and `-`) for an insert."""
    if token == "-" and allow_end:
        return length
    if not token.isdigit() or not token.isascii() or (len(token) > 1 and token[0] == "0"):
        raise PatchError(f"{token!r} is not an array index")
    index = int(token)
    if index > length or (index == length and not allow_end):
        raise PatchError(f"array index {index} is out of range (length {length})")
    return index


def _updated(node: Any, tokens: list[str], op: str, value: Any) -> Any:
    """`node` with the operation applied below it: a new container, the old one untouched."""
    token, last = tokens[0], len(tokens) == 1
    if isinstance(node, dict):
        if token not in node and not (last and op == "add"):
            raise PatchError(f"member {token!r} does not exist")
        copied = dict(node)
        copied[token] = value if last else _updated(node[token], tokens[1:], op, value)
        return copied
    if isinstance(node, list):
        index = _array_index(token, len(node), allow_end=last and op == "add")
        copied = list(node)
        if last and op == "add":
            copied.insert(index, value)
        else:
            copied[index] = value if last else _updated(node[index], tokens[1:], op, value)
        return copied
    raise PatchError(f"cannot resolve {token!r} inside a {type(node).__name__}")


def apply_patch(document: Any, operations: Sequence[Any]) -> Any:
    """The patched document; `document` and the operations' values are never changed (they are shared
    with the result, so treat the result as read-only). Raises PatchError."""
    if not isinstance(operations, (list, tuple)):
        raise PatchError("the patch is not a list of operations")
    for number, operation in enumerate(operations):
        if not isinstance(operation, dict):
            raise PatchError(f"operation {number} is not an object")
        op = operation.get("op")
        try:
            if op not in SUPPORTED_OPS:
                raise PatchError(f"unsupported op {op!r}")
            if "value" not in operation:
                raise PatchError("no value")
            tokens = _tokens(operation.get("path"))
            document = _updated(document, tokens, op, operation["value"]) if tokens else operation["value"]
        except PatchError as error:
            raise PatchError(f"operation {number} ({op} {operation.get('path')!r}): {error}") from None
    return document
