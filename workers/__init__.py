"""Process wiring: settings, logging, database and model lifecycles, Celery app, intake, CLI."""
