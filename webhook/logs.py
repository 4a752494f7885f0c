"""Structured JSON logs (one object per line on stderr) carrying the request uid.

The AdmissionReview uid is "suitable for correlating log entries between the
webhook and apiserver" (admission/v1 types.go), so every line logged while a
request is handled carries it, via a context variable set by the transport.
"""
from __future__ import annotations

import contextvars
import json
import logging
import os
import sys
import time

LOGGER_NAME = "bpfinit.webhook"
request_uid: contextvars.ContextVar[str | None] = contextvars.ContextVar("request_uid", default=None)

_RESERVED = frozenset(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "pid": record.process,
            "msg": record.getMessage(),
        }
        uid = request_uid.get()
        if uid:
            entry["uid"] = uid
        for key, value in record.__dict__.items():
            if key not in _RESERVED and not key.startswith("_"):
                entry[key] = value
        if record.exc_info:
            # Keep tracebacks out of anything a client sees; in the log they are one field.
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str, separators=(",", ":"))


def configure(level: str = "info") -> logging.Logger:
    logger = logging.getLogger(LOGGER_NAME)
    if not any(getattr(h, "_bpfinit", False) for h in logger.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(JsonFormatter())
        handler._bpfinit = True  # type: ignore[attr-defined]
        logger.addHandler(handler)
    logger.setLevel(getattr(logging, str(level).upper(), logging.INFO))
    logger.propagate = False
    return logger


def get_logger() -> logging.Logger:
    return logging.getLogger(LOGGER_NAME)


def level_from_env(default: str = "info") -> str:
    return os.environ.get("BPFINIT_WEBHOOK_LOG_LEVEL", default)


class QuietIdleTimeouts(logging.Filter):
    """gunicorn logs a traceback when a new connection sends no request in time (see
    webhook.certs.FIRST_REQUEST_TIMEOUT_S); that is routine, so say it in one debug line."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, TimeoutError):
            record.msg, record.args, record.exc_info, record.exc_text = (
                "closed a connection that sent no request in time", (), None, None)
            record.levelno, record.levelname = logging.DEBUG, "DEBUG"
            return record.name != "gunicorn.error" or logging.getLogger(record.name).isEnabledFor(logging.DEBUG)
        return True
