"""The shared vocabulary: key formats and hashes (keys.py), Redis key names (names.py),
the record's fields (record.py), IP encoding (ips.py), the Lua scripts and their
registry (scripts.py). Imports nothing else of the sidecar.
"""
