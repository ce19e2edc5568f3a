"""The pool and size a worker starts with (workers.worker_main.worker_pool)."""

from __future__ import annotations

from workers.worker_main import worker_pool


def test_a_gpu_worker_holds_two_batches_of_products_in_flight() -> None:
    assert worker_pool(gpu=True, batch_size=8, concurrency=None) == ("threads", 16)
    assert worker_pool(gpu=True, batch_size=32, concurrency=None) == ("threads", 64)


def test_cpu_workers_fork_and_an_explicit_concurrency_wins() -> None:
    assert worker_pool(gpu=False, batch_size=8, concurrency=None) == ("prefork", 2)
    assert worker_pool(gpu=True, batch_size=8, concurrency=5) == ("threads", 5)
    assert worker_pool(gpu=False, batch_size=8, concurrency=3) == ("prefork", 3)
