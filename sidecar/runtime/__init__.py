"""The process: settings, logs, metrics, the embedded redis-server, and the composition
roots that put the planes on listeners (server.py: data plane, admin_app.py: admin).
"""
