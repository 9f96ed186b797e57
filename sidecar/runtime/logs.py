"""JSON-lines logging. Messages never carry a plaintext key: the hot path logs none."""

from __future__ import annotations

import logging
import sys
import time

import orjson


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        doc = {"ts": round(time.time(), 3), "level": record.levelname.lower(),
               "logger": record.name, "msg": record.getMessage()}
        doc.update(getattr(record, "fields", {}))
        if record.exc_info:
            doc["error"] = self.formatException(record.exc_info).splitlines()[-1]
        return orjson.dumps(doc, default=str).decode()


def setup(level: str = "info") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)


def event(name: str, **fields) -> None:
    """One JSON line for a lifecycle event (start, stop, redis up/down, ...)."""
    logging.getLogger("sidecar").info(name, extra={"fields": {"event": name, **fields}})
