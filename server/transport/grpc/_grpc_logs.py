"""What grpcio itself logs, made to fit: a client that goes away is not an error."""

from __future__ import annotations

import logging

__all__ = ["quiet_client_cancels"]

_CYGRPC = "grpc._cython.cygrpc"
# grpcio logs this, with a traceback, when a response could not be sent because the call was
# over: almost always a client that cancelled, or dropped its connection, while the server was
# writing to it (its "client closed" flag can lag behind the failed write).
_FAILED_BATCH = "ExecuteBatchError raised in core by servicer method"

log = logging.getLogger("rnnstream.grpc")


class _ClientCancels(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if not message.startswith(_FAILED_BATCH):
            return True
        method = message.removeprefix(_FAILED_BATCH).strip(" []")
        log.debug("a %s call ended before its response was sent (the client left)", method)
        return False


_FILTER = _ClientCancels()


def quiet_client_cancels() -> None:
    """Log a call the client ended mid-response at DEBUG, without a traceback (idempotent)."""
    logger = logging.getLogger(_CYGRPC)
    if _FILTER not in logger.filters:
        logger.addFilter(_FILTER)
