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

    # per call: a warm-up, then two timed calls, per round; the load doubles in round 2
    fast = step("jax", [9.0, 1.0, 1.0, 9.0, 2.0, 2.0])
    slow = step("torch", [9.0, 3.0, 3.0, 9.0, 6.0, 6.0])
    seconds, faults = _common.alternated({"jax": fast, "torch": slow}, rounds=2, repeats=2)
    assert calls == ["jax"] * 3 + ["torch"] * 3 + ["jax"] * 3 + ["torch"] * 3
    assert seconds == {"jax": [1.0, 2.0], "torch": [3.0, 6.0]}  # warm-up calls are not counted
    assert set(faults) == {"jax", "torch"}
