"""One store command: open the store, make the command's ControlStore call, print.

Every command acts as the operator (actor `cli`, the root principal of
control/policy.py) through the same ControlStore as the admin API, so the checks,
cascades and audit entries are the same whichever way a change arrives. A control-plane
error becomes one line: a 400 is a bad command line (exit 2), the rest failed (exit 1).
"""

from __future__ import annotations

import argparse

from ..runtime.config import Settings, state_path
from .output import emit
from .parsing import CliError, UsageError, command_name


async def run(args: argparse.Namespace, settings: Settings) -> int:
    from redis.exceptions import RedisError

    from ..control.errors import ControlError, InvalidKeySpec, KeyError_, from_key_error
    from ..control.store import ControlStore
    from ..redis.runner import control_client
    from ..schema.keys import KeyHasher

    settings, started, lock = open_store(settings)
    client = control_client(settings.redis_url, settings.redis_timeout_ms / 1000 * 8,
                            settings.redis_pool_size)
    try:
        try:
            store = ControlStore(client, KeyHasher(settings.key_pepper),
                                 settings.budget_timezone)
            store.configure(settings)
            result = await args.run(args, store)
        except (InvalidKeySpec, KeyError_) as exc:   # a key store error passed through
            raise from_key_error(exc) from None
    except ControlError as exc:
        raise (UsageError if exc.status == 400 else CliError)(exc.message) from None
    except (RedisError, OSError) as exc:
        from ..runtime.config import mask_url
        raise CliError(f"cannot reach Redis at {mask_url(settings.redis_url)}: "
                       f"{exc or type(exc).__name__}") from None
    finally:
        await client.aclose()
        if started is not None:
            started.stop()
        if lock is not None:
            lock.release()
    emit(result, args)
    return 0


def open_store(settings: Settings):
    """(settings, redis-server started for this command, lock) for a CLI command. With the
    embedded default the store must exist: the CLI never makes a new one (and a new
    pepper) in a folder the server does not use."""
    if not settings.embedded_redis:
        return settings, None, None
    from ..runtime.embedded import for_command, store_exists

    state = state_path(settings)
    if not store_exists(state):
        where = "state_dir" if settings.state_dir else "the default state_dir"
        raise CliError(f"no sidecar store in {state} ({where}); create it with "
                       f"`{command_name()} serve`, or name yours with --state-dir DIR "
                       f"or SIDECAR_STATE_DIR")
    return for_command(settings)
