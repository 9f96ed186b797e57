"""The control plane: organizations, members, projects, service accounts, subscriptions,
org-scoped key operations (ownership rules, cascades, rotation) and the audit log.

Transport-free: the admin HTTP API (sidecar/admin/) and the CLI (sidecar/cli/admin.py)
both call `ControlStore` with an `Actor`, so the rules and the audit trail are the same
whichever way a change arrives.
"""
