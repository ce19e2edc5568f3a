"""Maintenance of the system's own bookkeeping: retention (``catalog.prune``) and dead letters."""
