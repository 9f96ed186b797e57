"""Redis storage: key names, Lua scripts, the batching connection and the key store."""
