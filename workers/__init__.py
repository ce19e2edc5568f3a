"""Process wiring: settings, logging, database and model lifecycles, Celery app, intake, CLI."""

import os

# Worker processes share the cores with each other (an events/CPU worker's prefork children beside a
# model worker on one box). OpenMP threads that spin while they wait burn the very core the thread
# they wait for needs: measured with the embeddings-only benchmark, the model worker used 135 ms of
# CPU per photo spinning against 93 ms passive. Set here, before anything imports torch; an explicit
# setting in the environment wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
