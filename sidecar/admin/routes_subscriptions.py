"""Admin API: subscriptions, a plan with a cycle quota and renewal date, each with its
auto-created sk-sub- key (plaintext once) and its PAYG-fallback switch."""

from __future__ import annotations

from . import schemas as s
from .routing import AdminCall, Route, page


async def list_subscriptions(c: AdminCall):
    return 200, page(await c.store.list_subscriptions(c.org), c.query)


async def create_subscription(c: AdminCall):
    sub, plaintext = await c.store.create_subscription(c.org, c.body, c.actor)
    return 201, {**sub, "key": plaintext}


async def get_subscription(c: AdminCall):
    return 200, await c.store.subscription(c.org, c.params["subscription_id"])


async def update_subscription(c: AdminCall):
    return 200, await c.store.update_subscription(c.org, c.params["subscription_id"],
                                                  c.body, c.actor)


async def cancel_subscription(c: AdminCall):
    return 200, await c.store.cancel_subscription(c.org, c.params["subscription_id"],
                                                  c.actor)


S = "/subscriptions/{subscription_id}"
ROUTES = [
    Route("GET", "/subscriptions", "subscription.read", "List subscriptions",
          list_subscriptions, "Subscription", query=s.PAGE_QUERY, list_of=True,
          tag="subscriptions"),
    Route("POST", "/subscriptions", "subscription.create", "Start a subscription; its "
          "sk-sub- key is created with it and returned once", create_subscription,
          "SubscriptionCreated", status=201, body=s.SUB_CREATE, tag="subscriptions"),
    Route("GET", S, "subscription.read", "Get a subscription (cycle, renewal, balance)",
          get_subscription, "Subscription", tag="subscriptions"),
    Route("PATCH", S, "subscription.update", "Change plan, cycle quota or PAYG fallback",
          update_subscription, "Subscription", body=s.SUB_UPDATE, tag="subscriptions"),
    Route("DELETE", S, "subscription.cancel", "Cancel: disables its key",
          cancel_subscription, "Deleted", tag="subscriptions"),
]
