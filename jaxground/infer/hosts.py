"""`jaxground predict` and `eval` on several hosts: the processes refuse together, before the model loads (`Hosts`),
and check that they read the same inputs (`digest` of a predict `command.Request`, `checkpoint.identity`)."""

from __future__ import annotations


class Hosts:
    """Makes the processes of a multi-host run refuse together with `error` (the command's refusal type). Each
    checks its flags and inputs alone, then, before the model loads, they compare verdicts (`agree`): a host that
    cannot read a file makes every host refuse with its message, where exiting alone would leave the others
    waiting for it in the first collective (or failing inside Orbax's restore). On one process there is nothing
    to compare and the messages stay as they are."""

    def __init__(self, error: type[Exception]):
        self.error = error
        self.compared = False

    def agree(self, inputs: dict[str, object]) -> None:
        """Raises `error` on every process when any process refused, or when one read other `inputs` than process
        0 (JSON-able values by name: `{"checkpoint": "step 3", ...}`; a string value is quoted in the message)."""
        self._compare(None, inputs)

    def refusal(self, error: Exception) -> str:
        """The message to print for `error`. Raised before the comparison, it joins the comparison the others wait
        in, and every process prints the first refusing process's message; raised after it, its own."""
        import jax

        if self.compared or jax.process_count() == 1:
            return str(error)
        try:
            self._compare(str(error), {})
        except self.error as first:
            return str(first)
        return str(error)  # not reached: this process refused

    def _compare(self, error: str | None, inputs: dict) -> None:
        from jaxground.eval.gather import from_every_process

        self.compared = True
        verdicts = from_every_process({"error": error, "inputs": inputs})
        if len(verdicts) == 1:
            return
        refused = [(i, v["error"]) for i, v in enumerate(verdicts) if v["error"] is not None]
        if refused:
            raise self.error("process {}: {}".format(*refused[0]))
        first = verdicts[0]["inputs"]
        for i, v in enumerate(verdicts):
            for name, value in v["inputs"].items():
                if value != first[name]:
                    shown = f" ({value} against {first[name]})" if isinstance(value, str) else ""
                    raise self.error(f"process {i} read other {name} than process 0{shown}: every host must read "
                                     "the same files")


def predict_inputs(requests: list, checkpoint: str) -> dict:
    """What the hosts of a `predict` run must read alike: each request (`digest`) and the checkpoint
    (`checkpoint.identity`), by the names a refusal gives them."""
    return {"requests (image pixels, prompt or boxes)": [digest(r) for r in requests], "checkpoint": checkpoint}


def digest(req) -> str:
    """A hash of what a request computes on: every host feeds its own copy of the inputs to the same devices."""
    import hashlib

    import numpy as np

    h = hashlib.sha256(repr((req.image.shape, req.prompt)).encode())
    h.update(np.ascontiguousarray(req.image).tobytes())
    h.update(np.asarray(req.boxes, np.float32).tobytes())
    return h.hexdigest()
