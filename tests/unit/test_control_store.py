"""ControlStore is composed of services: each operation it offers is one of theirs."""

from __future__ import annotations

import inspect

from sidecar.control import store
from sidecar.control.admin_keys import AdminKeys
from sidecar.control.entities import Entities
from sidecar.control.key_ops import KeyOps
from sidecar.control.limit_rules import LimitRules
from sidecar.control.subscriptions import Subscriptions
from sidecar.control.webhooks import Webhooks

SERVICES = {"entities": Entities, "keys": KeyOps, "subscriptions": Subscriptions,
            "webhooks": Webhooks, "limits": LimitRules, "admin_keys": AdminKeys}


def test_every_operation_is_a_service_coroutine():
    ops = {name: op for name, op in vars(store.ControlStore).items()
           if isinstance(op, store._Op)}
    assert len(ops) > 30
    for name, op in ops.items():
        assert inspect.iscoroutinefunction(getattr(SERVICES[op.service], name)), name


def test_every_public_service_operation_is_offered():
    # a new public operation of a service is reachable from the admin API and the CLI
    offered = {name for name, op in vars(store.ControlStore).items()
               if isinstance(op, store._Op)}
    internal = {"entity", "create_unique", "org_key"}   # shared helpers, not operations
    for cls in SERVICES.values():
        public = {n for n, f in vars(cls).items()
                  if inspect.iscoroutinefunction(f) and not n.startswith("_")}
        assert public - internal <= offered, public - internal - offered
