"""The admin HTTP API under /admin/v1 on the admin listener (see api.py)."""

from .api import setup_admin_api

__all__ = ["setup_admin_api"]
