"""Run a handler coroutine the way a Task would, minus the Task (OPTIMIZATIONS §2).

Both transports of the data plane (the HTTP edge, gRPC ext_authz) step the decision
coroutine themselves: it runs at once, up to its Redis call, and resumes from its
batch's future, so a call costs no Task, no context and no extra loop iteration.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

from .http_messages import Answer, error_answer

log = logging.getLogger("sidecar.edge")
T = TypeVar("T")


def step(coro: Coroutine[Any, Any, Answer], done: Callable[[T, Answer], None],
         arg: T) -> None:
    """Advance `coro`; when it returns, `done(arg, answer)`. A handler that raises is a
    bug, not a decision: logged, and answered with a JSON 500."""
    try:
        awaited = coro.send(None)
    except StopIteration as finished:
        done(arg, finished.value)
        return
    except Exception:
        log.exception("handler failed")
        done(arg, error_answer(500, "internal_error", "Internal error."))
        return
    if awaited is None:                       # a bare yield (asyncio.sleep(0))
        asyncio.get_running_loop().call_soon(step, coro, done, arg)
    else:                                     # an asyncio future: resume when done
        # As Task.__step does: clear the flag the future set when it was yielded, or
        # the next coroutine awaiting the same (shared, per-batch) future is refused
        # with "await wasn't used with future".
        awaited._asyncio_future_blocking = False
        awaited.add_done_callback(lambda _f: step(coro, done, arg))
