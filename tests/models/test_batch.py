"""The GPU stage's batch function and micro-batcher, on the tiny models (random weights, real code)."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
from PIL import Image

from models.batch import MicroBatcher, ModelItem, run_model_batch
from models.factory import ModelConfig, build_models
from models.oom import halve_on_oom, is_oom


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory, one_torch_thread: None):  # noqa: ANN201
    return build_models(ModelConfig(profile="tiny", device="cpu", cache_dir=tmp_path_factory.mktemp("cache"),
                                    max_new_tokens=32))


def _items(sample_photos: list[tuple[Path, str]], n: int, **extra: object) -> list[ModelItem]:
    return [ModelItem(job_id=i, image=Image.open(path).convert("RGB"), category=category, title=f"{category} {i}",
                      description="", attributes={}, locale="en", **extra)  # type: ignore[arg-type]
            for i, (path, category) in enumerate(sample_photos[:n])]


def test_oom_halves_the_batch_until_it_fits(bundle, sample_photos) -> None:  # noqa: ANN001
    sizes: list[int] = []

    def oom_above_one(items: list[ModelItem]) -> None:
        sizes.append(len(items))
        if len(items) > 1:
            raise RuntimeError("CUDA out of memory (test: batches above 1 do not fit)")

    results = run_model_batch(bundle, _items(sample_photos, 3), before=oom_above_one)
    assert [r.job_id for r in results] == [0, 1, 2]
    assert all(r.error is None and r.schema_id and len(r.image_embedding) == 512 for r in results)
    assert sizes == [3, 1, 2, 1, 1]  # 3 → [1] + [2] → [1] + [1]


def test_one_item_that_breaks_the_batch_fails_alone(bundle, sample_photos) -> None:  # noqa: ANN001
    def poison(items: list[ModelItem]) -> None:
        if any(i.job_id == 1 for i in items):
            raise ValueError("item 1 is broken")

    results = run_model_batch(bundle, _items(sample_photos, 3), before=poison)
    assert [r.error is None for r in results] == [True, False, True]
    assert results[1].error == ("model_error", "ValueError: item 1 is broken", False)


def test_oom_at_batch_size_one_is_that_items_retryable_error(bundle, sample_photos) -> None:  # noqa: ANN001
    def always_oom(items: list[ModelItem]) -> None:
        raise RuntimeError("CUDA out of memory")

    (result,) = run_model_batch(bundle, _items(sample_photos, 1), before=always_oom)
    assert result.error == ("model_out_of_memory", "accelerator out of memory at batch size 1", True)


def test_a_refused_category_is_that_items_error(bundle, sample_photos) -> None:  # noqa: ANN001
    items = _items(sample_photos, 2)
    items[0].category, items[0].unknown_category = "spaceship", "reject"
    results = run_model_batch(bundle, items)
    assert results[0].error is not None and results[0].error[0] == "unsupported_category"
    assert results[1].error is None


def test_halving_raises_an_oom_that_does_not_fit_one_item() -> None:
    with pytest.raises(MemoryError):
        halve_on_oom(lambda a, b: (_ for _ in ()).throw(RuntimeError("out of memory")), 4,
                     at_one=lambda exc: MemoryError(str(exc)))
    assert halve_on_oom(lambda a, b: list(range(a, b)), 5) == [0, 1, 2, 3, 4]
    assert is_oom(RuntimeError("CUDA out of memory. Tried to allocate")) and not is_oom(ValueError("bad"))


def test_micro_batcher_fills_batches_and_hands_each_caller_its_result() -> None:
    sizes: list[int] = []
    release = threading.Event()

    def run(items: list[int]) -> list[int]:
        release.wait(5)
        sizes.append(len(items))
        return [i * 10 for i in items]

    batcher: MicroBatcher[int, int] = MicroBatcher(run, max_size=2, max_wait_ms=200)
    try:
        futures = [batcher.submit(i) for i in range(5)]
        release.set()
        assert [f.result(timeout=10) for f in futures] == [0, 10, 20, 30, 40]
        assert sum(sizes) == 5 and max(sizes) <= 2 and batcher.items_run == 5
    finally:
        batcher.close()


def test_micro_batcher_hands_a_batch_failure_to_every_caller() -> None:
    def run(items: list[int]) -> list[int]:
        raise RuntimeError("model thread broke")

    batcher: MicroBatcher[int, int] = MicroBatcher(run, max_size=4, max_wait_ms=50)
    try:
        futures = [batcher.submit(i) for i in range(3)]
        for f in futures:
            with pytest.raises(RuntimeError, match="model thread broke"):
                f.result(timeout=10)
    finally:
        batcher.close()


def test_micro_batcher_wait_is_bounded_and_a_withdrawn_item_never_runs() -> None:
    from models.batch import BatcherUnavailable, BatchWaitTimeout

    release = threading.Event()
    seen: list[list[int]] = []

    def run(items: list[int]) -> list[int]:
        seen.append(list(items))
        release.wait(10)  # the model thread is stuck on the first batch
        return items

    batcher: MicroBatcher[int, int] = MicroBatcher(run, max_size=1, max_wait_ms=0)
    try:
        first = batcher.submit(1)
        started = time.monotonic()
        with pytest.raises(BatchWaitTimeout) as info:
            batcher.run(2, timeout=0.3)  # queued behind the stuck batch
        assert 0.25 <= time.monotonic() - started < 3
        assert isinstance(info.value, BatcherUnavailable) and isinstance(info.value, TimeoutError)
        release.set()
        assert first.result(timeout=5) == 1
        assert batcher.run(3, timeout=5) == 3
        assert seen == [[1], [3]]  # item 2 was withdrawn when its caller gave up: no wasted model run
    finally:
        release.set()
        batcher.close()


def test_micro_batcher_watchdog_fails_waiters_refuses_work_and_asks_for_a_restart_when_a_batch_hangs() -> None:
    from models.batch import BatcherHung

    never = threading.Event()
    hung_calls: list[float] = []

    def run(items: list[int]) -> list[int]:
        never.wait(30)  # a model call that does not come back
        return items

    batcher: MicroBatcher[int, int] = MicroBatcher(run, max_size=1, max_wait_ms=0, hang_after_s=0.4,
                                                   on_hang=lambda: hung_calls.append(time.monotonic()))
    try:
        started = time.monotonic()
        running, queued = batcher.submit(1), batcher.submit(2)
        for fut in (running, queued):  # both callers learn at once, long before their own timeouts
            with pytest.raises(BatcherHung):
                fut.result(timeout=5)
        assert 0.35 <= time.monotonic() - started < 3
        assert batcher.hung and len(hung_calls) == 1
        with pytest.raises(BatcherHung):
            batcher.run(3, timeout=5)  # refused at once: the process is on its way out
        time.sleep(0.6)
        assert len(hung_calls) == 1  # one restart request, however long the thread stays stuck
    finally:
        never.set()
        batcher.close()


def test_micro_batcher_watchdog_leaves_slow_but_finishing_batches_alone() -> None:
    hung_calls: list[int] = []

    def run(items: list[int]) -> list[int]:
        time.sleep(0.1)
        return [i + 1 for i in items]

    batcher: MicroBatcher[int, int] = MicroBatcher(run, max_size=2, max_wait_ms=10, hang_after_s=0.5,
                                                   on_hang=lambda: hung_calls.append(1))
    try:
        assert [batcher.run(i, timeout=5) for i in range(8)] == list(range(1, 9))  # 0.8 s of batches in all
        assert not batcher.hung and hung_calls == []
    finally:
        batcher.close()


def test_micro_batcher_gives_the_model_load_its_own_allowance_and_still_catches_a_load_that_hangs() -> None:
    from models.batch import BatcherHung

    loads: list[float] = []

    def slow_first_load() -> None:  # a first batch loads the models: longer than a batch may run
        if not loads:
            time.sleep(0.8)
        loads.append(time.monotonic())

    batcher: MicroBatcher[int, int] = MicroBatcher(lambda items: [i * 2 for i in items], max_size=1, max_wait_ms=0,
                                                   hang_after_s=0.3, prepare=slow_first_load, load_factor=5)
    try:
        assert batcher.run(2, timeout=5) == 4 and batcher.run(3, timeout=5) == 6
        assert not batcher.hung and len(loads) == 2
    finally:
        batcher.close()

    never = threading.Event()
    hung = MicroBatcher(lambda items: items, max_size=1, max_wait_ms=0, hang_after_s=0.2,
                        prepare=lambda: never.wait(30), load_factor=3, on_hang=lambda: None)
    try:
        started = time.monotonic()
        with pytest.raises(BatcherHung, match="limit 0.6 s"):
            hung.run(1, timeout=10)
        assert 0.55 <= time.monotonic() - started < 3  # the load allowance, not the batch's 0.2 s
    finally:
        never.set()
        hung.close()


def test_a_confident_category_disagreement_is_a_conflict_and_nothing_else_is() -> None:
    from models.batch import category_conflict

    vote = {"stated": "dress", "predicted": "shoes", "probability": 0.93, "stated_probability": 0.02, "mismatch": True}
    assert category_conflict(vote, "Dress") == [
        {"attribute": "category", "merchant_value": "Dress", "image_value": "shoes", "confidence": 0.93}]
    assert category_conflict({**vote, "mismatch": False}, "Dress") == []
    assert category_conflict(None, "socks") == []
