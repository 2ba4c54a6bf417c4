"""`_common.alternated` times the frameworks in turn, round after round, on a made-up clock."""

from jaxground.bench import _common


def test_rounds_alternate_and_each_round_is_timed_apart(monkeypatch):
    clock, calls = [0.0], []
    monkeypatch.setattr(_common.time, "perf_counter", lambda: clock[0])

    def step(name, seconds):
        def fn():
            calls.append(name)
            clock[0] += seconds.pop(0)
        return fn

    # per call: a warm-up, then two timed calls, per round; the load rises in round 2
    fast = step("jax", [9.0, 1.0, 1.0, 9.0, 2.0, 2.0])
    slow = step("torch", [9.0, 3.0, 3.0, 9.0, 8.0, 8.0])
    timings = _common.alternated({"jax": fast, "torch": slow}, rounds=2, repeats=2)
    assert calls == ["jax"] * 3 + ["torch"] * 3 + ["jax"] * 3 + ["torch"] * 3
    assert timings.seconds == {"jax": [1.0, 2.0], "torch": [3.0, 8.0]}  # warm-up calls are not counted
    assert set(timings.faults) == {"jax", "torch"}
    assert timings.median("torch") == 5.5
    assert timings.ratio("torch", "jax") == "3.50x (3.00-4.00)"  # per round 3/1 and 8/2
