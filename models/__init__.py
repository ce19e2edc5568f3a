"""ML wrappers: load once, predict in batches. Pure: never imports db, celery, tasks or workers."""
