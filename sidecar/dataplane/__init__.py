"""The data plane: every proxy call, from the socket to the answer.

Imports schema/, redis/ and runtime's config, logs and metrics; never control/, admin/
or cli/ (tests/unit/test_layout.py).
"""
