"""Celery tasks (thin adapters) and the plain pipeline functions they call.

Tasks never import ``workers``: the worker process installs a ``tasks.runtime.Runtime``
(session factory, models, storage, publisher, limits) at start-up, and tasks read it from there.
"""
