"""`jaxground predict` on several hosts: what the hosts compare before the model loads (`distributed.Hosts`), so that
they read the same requests (`digest` of a `command.Request`) and the same checkpoint (`checkpoint.identity`)."""

from __future__ import annotations


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
