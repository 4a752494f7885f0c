"""sha256 for build and config digests, without loading OpenSSL.

`hashlib` loads libcrypto at import (~2 ms, a tenth of the warm setup's own imports); CPython's built-in
`_sha256` computes the same digest. Falls back to hashlib where the built-in module is absent.
"""
try:
    from _sha256 import sha256  # noqa: F401
except ImportError:  # pragma: no cover - CPython builds without the built-in module
    from hashlib import sha256  # noqa: F401
