"""Running a batch so that one bad request costs no other request its answer.

`@serve.batch` hands one exception to every request of a batch. The deployments run their
batches through `isolated` instead: requests that share settings run together, and when a
group fails its requests run one by one, so the failure lands on the request that caused it
(as a `protocol.Failure` in its place) and every other request is answered.
"""

from __future__ import annotations

import logging
import sys
import traceback
from collections.abc import Callable, Sequence
from itertools import groupby
from typing import Any, TypeVar

from serve_app.protocol import Failure

logger = logging.getLogger("ray.serve")
T = TypeVar("T")

#: Text of exceptions that mean the device is broken, not the request: the replica reports
#: itself unhealthy (check_health) and Serve replaces it.
DEVICE_FAULTS = ("CUDA error", "device-side assert", "CUBLAS_STATUS")


def isolated(
    items: Sequence[T],
    settings: Callable[[T], tuple],
    run: Callable[[tuple, list[T]], list[Any]],
    on_fault: Callable[[BaseException], None] | None = None,
) -> list[Any]:
    """Answers in item order: `run(shared settings, group)` per group of items that share
    settings; a group that raises is rerun item by item, and an item that still raises gets
    a Failure. `on_fault` sees every exception (to notice a broken device)."""
    out: list[Any] = [None] * len(items)
    key = lambda i: settings(items[i])  # noqa: E731
    for shared, group in groupby(sorted(range(len(items)), key=key), key=key):
        idx = list(group)
        failed: Exception | None = None
        try:
            answers = run(shared, [items[i] for i in idx])
        except Exception as err:
            failed = err
        if failed is not None:  # one of them, or the device: find out one by one
            # Outside the except clause, and with the failed call's frames cleared: until
            # then they hold what the batch allocated (on a GPU, its activations and cache),
            # which an out-of-memory error must give back before the reruns (on_fault).
            traceback.clear_frames(failed.__traceback__)
            _seen(failed, on_fault)
            failed = None
            answers = [_alone(run, shared, items[i], on_fault) for i in idx]
        for i, answer in zip(idx, answers, strict=True):
            out[i] = answer
    return out


def _alone(
    run: Callable[[tuple, list[Any]], list[Any]],
    shared: tuple,
    item: Any,
    on_fault: Callable[[BaseException], None] | None,
) -> Any:
    try:
        return run(shared, [item])[0]
    except Exception as err:
        _seen(err, on_fault)
        logger.exception("a request of the batch failed alone", exc_info=err)
        return Failure(message=f"{type(err).__name__} while running the request")


def _seen(err: BaseException, on_fault: Callable[[BaseException], None] | None) -> None:
    if on_fault is not None:
        on_fault(err)


def is_device_fault(err: BaseException) -> bool:
    """Whether an exception says the accelerator itself is broken. Running out of its memory
    is not: one batch or prompt too large for it fails alone (isolated reruns the others one
    by one), and replacing the replica would cost every other request on it its answer."""
    if is_out_of_memory(err):
        return False
    text = f"{type(err).__name__}: {err}"
    return any(marker in text for marker in DEVICE_FAULTS)


def is_out_of_memory(err: BaseException) -> bool:
    """Whether an exception is the accelerator running out of memory (torch's
    OutOfMemoryError, or the CUDA runtime's "out of memory")."""
    return type(err).__name__ == "OutOfMemoryError" or "out of memory" in str(err).lower()


def free_device_cache() -> None:
    """Hand torch's cached accelerator memory back after an out-of-memory error, so the
    requests rerun one by one have room (no-op without torch or CUDA)."""
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()


class DeviceHealth:
    """For a deployment class: notes a broken device from the exceptions it sees, and reports
    it to Serve's health check, which then replaces the replica."""

    fault: str | None = None

    def check_health(self) -> None:
        """Serve's health check: a replica whose device broke is replaced."""
        if self.fault:
            raise RuntimeError(f"the device is broken: {self.fault}")

    def _noticed(self, err: BaseException) -> None:
        if is_out_of_memory(err):
            free_device_cache()
        elif is_device_fault(err):
            self.fault = f"{type(err).__name__}: {err}"[:500]
