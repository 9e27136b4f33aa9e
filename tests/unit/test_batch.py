"""One bad request of a batch fails alone; the others are answered."""

from __future__ import annotations

import pytest

from serve_app.batch import DeviceHealth, is_device_fault, isolated
from serve_app.protocol import Failure


def _double(settings: tuple, group: list[int]) -> list[int]:
    if 13 in group:
        raise ValueError("13 is poison")
    return [x * 2 for x in group]


def test_a_poisoned_item_fails_alone_and_the_rest_are_answered():
    answers = isolated([1, 13, 2, 3], lambda x: (), _double)
    assert answers[0] == 2 and answers[2:] == [4, 6]
    assert isinstance(answers[1], Failure) and not answers[1].client
    assert "ValueError" in answers[1].message


def test_groups_by_settings_keep_the_input_order():
    seen: list[tuple] = []

    def run(settings: tuple, group: list[int]) -> list[int]:
        seen.append((settings, tuple(group)))
        return [x + settings[0] for x in group]

    assert isolated([1, 2, 3, 4], lambda x: (x % 2,), run) == [2, 2, 4, 4]
    assert sorted(seen) == [((0,), (2, 4)), ((1,), (1, 3))]


def test_every_exception_is_shown_to_the_fault_hook():
    faults: list[BaseException] = []
    isolated([13, 1], lambda x: (), _double, faults.append)
    assert len(faults) == 2  # the group's, then the poisoned item's alone


def test_device_faults_are_told_from_request_faults():
    assert is_device_fault(RuntimeError("CUDA error: device-side assert triggered"))
    assert not is_device_fault(ValueError("bad seed"))


def test_running_out_of_device_memory_fails_the_request_not_the_replica():
    # One batch too large for the GPU: its requests rerun one by one, the one that still does
    # not fit fails alone, and the replica stays healthy (no replacement, no lost answers).
    class OutOfMemoryError(RuntimeError):  # torch.cuda.OutOfMemoryError's name
        pass

    oom = OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    assert not is_device_fault(oom)
    assert not is_device_fault(RuntimeError("CUDA error: out of memory"))

    def run(_: tuple, group: list[int]) -> list[int]:
        if sum(group) > 10:  # the memory a batch takes grows with its prompts
            raise oom
        return [x * 2 for x in group]

    health = DeviceHealth()
    out = isolated([3, 4, 20], lambda _: (), run, health._noticed)
    assert out[:2] == [6, 8] and isinstance(out[2], Failure)
    health.check_health()  # still healthy
    health._noticed(RuntimeError("CUDA error: device-side assert triggered"))
    with pytest.raises(RuntimeError, match="the device is broken"):
        health.check_health()


def test_what_a_failed_batch_held_is_given_back_before_its_requests_rerun():
    # The failed call's frames hold what the batch allocated (on a GPU, its activations and
    # cache): the fault hook (which empties torch's cache) and the reruns one by one must
    # not run while it is still held.
    import weakref

    class Activations:
        pass

    held: list[weakref.ref] = []
    alive: list[bool] = []

    def run(_: tuple, group: list[int]) -> list[int]:
        if len(group) > 1:
            activations = Activations()
            held.append(weakref.ref(activations))
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
        alive.append(held[0]() is not None)  # during each rerun
        return [x * 2 for x in group]

    def on_fault(err: BaseException) -> None:
        alive.append(held[0]() is not None)

    assert isolated([1, 2, 3], lambda _: (), run, on_fault) == [2, 4, 6]
    assert alive == [False, False, False, False]
