"""`eval.progress.Progress` on a made-up clock: when it prints and what the estimate counts."""

import pytest

from jaxground.eval.progress import Progress, duration


def run(times, total, every):
    """Batches ending at `times` (seconds; the split starts at 0) -> the lines printed."""
    clock = iter([0.0, *times, times[-1] + 1.0])
    lines = []
    shown = Progress("rec/val", total, 64, every, clock=lambda: next(clock), show=lines.append)
    step = shown.wrap(lambda batch: {"n": batch})
    assert [step(i)["n"] for i in range(len(times))] == list(range(len(times)))
    shown.done({"count": 5})
    return lines


def test_lines_at_most_every_period_and_the_estimate_leaves_out_the_first_batch():
    # the first batch takes 40 s (compiling), the next ones 2 s each
    lines = run([40.0, 42.0, 44.0, 46.0, 48.0, 50.0], total=10, every=5.0)
    assert lines == [
        "eval rec/val: 10 batches of 64 rows",
        "eval rec/val: batch 1 of 10 (10%)",  # 40 s after the start line; no rate from one batch
        "eval rec/val: batch 4 of 10 (40%), 2.00 s a batch, about 12.0s left",  # 46 - 40 >= 5; 6 batches of 2 s
        'eval rec/val: done in 51.0s: {"count": 5}',
    ]


def test_no_line_for_the_last_batch_none_between_at_zero_and_silent_at_none():
    assert len(run([10.0, 20.0, 30.0], total=3, every=5.0)) == 4  # batches 1 and 2; the 3rd is the end
    assert run([10.0, 20.0, 30.0], total=3, every=0) == [
        "eval rec/val: 3 batches of 64 rows", 'eval rec/val: done in 31.0s: {"count": 5}']
    assert run([10.0, 20.0], total=None, every=5.0)[:3] == [
        "eval rec/val: an unknown number of batches of 64 rows", "eval rec/val: batch 1",
        "eval rec/val: batch 2, 10.00 s a batch"]
    assert run([10.0], total=1, every=None) == []


@pytest.mark.parametrize("seconds, text", [(4.25, "4.2s"), (65.2, "1m 5s"), (3725.0, "1h 2m 5s")])
def test_duration(seconds, text):
    assert duration(seconds) == text
