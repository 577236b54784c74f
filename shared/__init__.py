"""Code common to the gateway and the worker: the contract they meet on.

Wire messages, settings, logging, the key format, errors and every queue,
exchange and Redis key name live here. Nothing here imports a service.
"""
