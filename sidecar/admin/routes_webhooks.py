"""Admin API: the organization's webhook endpoints (docs/webhooks.md). The secret that
signs deliveries is returned once, when the endpoint is made."""

from __future__ import annotations

from . import schemas as s
from .routing import AdminCall, Route, page


async def list_webhooks(c: AdminCall):
    return 200, page(await c.store.list_webhooks(c.org, c.actor), c.query)


async def create_webhook(c: AdminCall):
    return 201, await c.store.create_webhook(c.org, c.body, c.actor)


async def get_webhook(c: AdminCall):
    return 200, await c.store.webhook(c.org, c.params["webhook_id"], c.actor)


async def delete_webhook(c: AdminCall):
    return 200, await c.store.delete_webhook(c.org, c.params["webhook_id"], c.actor)


W = "/webhooks/{webhook_id}"
ROUTES = [
    Route("GET", "/webhooks", "webhook.read", "List the organization's webhook endpoints",
          list_webhooks, "WebhookEndpoint", query=s.PAGE_QUERY, list_of=True,
          tag="webhooks"),
    Route("POST", "/webhooks", "webhook.create", "Add a webhook endpoint; its signing "
          "secret (whsec_...) is returned once", create_webhook, "WebhookEndpointCreated",
          status=201, body=s.WEBHOOK_CREATE, tag="webhooks"),
    Route("GET", W, "webhook.read", "Get a webhook endpoint (never its secret)",
          get_webhook, "WebhookEndpoint", tag="webhooks"),
    Route("DELETE", W, "webhook.delete", "Delete a webhook endpoint", delete_webhook,
          "Deleted", tag="webhooks"),
]
