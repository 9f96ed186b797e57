"""API-key auth sidecar for LLM API gateways."""

__version__ = "0.1.0"
