"""The bounds of every control-plane input, named once.

The admin API's JSON schemas (admin/schemas.py), the pure checks (control/checks.py) and
the key settings check (control/key_spec.py) all read these, so a limit cannot differ
between the API, the CLI and the store.
"""

from __future__ import annotations

from ..schema.record import DAY_MS, MAX_QUOTA

__all__ = ["MAX_QUOTA"]

MAX_NAME = 200                 # a name, plan or idempotency key (characters)
MAX_USER = 320                 # a member's user (an e-mail address at most)
MAX_ID = 64                    # an id in a path or body
MAX_MODEL_NAME = 256           # one model name
MAX_MODELS = 100               # models a key may list
MAX_IPS = 100                  # networks a key may list
MAX_IP_TEXT = 64               # one address or CIDR as text
MAX_SCOPES = 50                # scopes of a restricted key
MIN_SCOPE, MAX_SCOPE = 3, 100  # one scope, resource:read|write
MAX_ACCOUNT = 128              # a billing account's name
ACCOUNT_CHARS = "A-Za-z0-9_.@+-"
MAX_CYCLE_DAYS = 3660          # a subscription's billing cycle (days)
MAX_GRACE_S = 30 * DAY_MS // 1000   # a rotation's grace window (seconds)
DEFAULT_PAGE = 100             # items per page of a list when none is asked for
MAX_PAGE = 500                 # items per page of a list at most
MAX_WHEN = 64                  # an ISO-8601 date-time as text
MAX_ACTION = 100               # an audit action filter
