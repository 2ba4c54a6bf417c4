"""`jaxground predict` on several hosts: the processes refuse together, before the model loads (`Hosts`), and
check that they read the same requests (`digest` of a `command.Request`)."""

from __future__ import annotations


class Hosts:
    """Makes the processes of a multi-host run refuse together. Each checks its flags and requests alone, then,
    before the model loads, they compare verdicts (`agree`): a host that cannot read a file makes every host
    refuse with its message, where exiting alone would leave the others waiting for it in the first collective.
    On one process there is nothing to compare and the messages stay as they are."""

    def __init__(self):
        self.compared = False

    def agree(self, requests: list) -> None:
        """Raises PredictError on every process when any process refused, or read other inputs than process 0."""
        self._compare(None, requests)

    def refusal(self, error: Exception) -> str:
        """The message to print for `error`. Raised before the comparison, it joins the comparison the others wait
        in, and every process prints the first refusing process's message; raised after it, its own."""
        import jax

        from jaxground.infer.predict import PredictError

        if self.compared or jax.process_count() == 1:
            return str(error)
        try:
            self._compare(str(error), [])
        except PredictError as first:
            return str(first)
        return str(error)  # not reached: this process refused

    def _compare(self, error: str | None, requests: list) -> None:
        from jaxground.eval.gather import from_every_process
        from jaxground.infer.predict import PredictError

        self.compared = True
        verdicts = from_every_process({"error": error, "inputs": [digest(r) for r in requests]})
        if len(verdicts) == 1:
            return
        refused = [(i, v["error"]) for i, v in enumerate(verdicts) if v["error"] is not None]
        if refused:
            raise PredictError("process {}: {}".format(*refused[0]))
        for i, v in enumerate(verdicts):
            if v["inputs"] != verdicts[0]["inputs"]:
                raise PredictError(f"process {i} read other requests than process 0 (image pixels, prompt or boxes): "
                                   "every host must read the same files")


def digest(req) -> str:
    """A hash of what a request computes on: every host feeds its own copy of the inputs to the same devices."""
    import hashlib

    import numpy as np

    h = hashlib.sha256(repr((req.image.shape, req.prompt)).encode())
    h.update(np.ascontiguousarray(req.image).tobytes())
    h.update(np.asarray(req.boxes, np.float32).tobytes())
    return h.hexdigest()
