"""Process wiring: settings, logging, database and model lifecycles, Celery app, intake, CLI."""

from workers.settings import default_openmp_wait_policy

# Before anything imports torch: every entry point (worker, beat, CLI) imports this package first.
default_openmp_wait_policy()
