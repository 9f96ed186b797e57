"""The one road to Redis: URLs and clients (runner.py), the batching pipeline of the hot
path (pipeline.py) and the script runner on top.
"""
