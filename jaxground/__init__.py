"""jaxground: NExT-Chat (pixel2emb grounding LMM) in JAX / Flax NNX."""

import flax

# Parameters carry *logical* axis names (see `jaxground/parallel.py`); they are placed on a mesh only when
# a sharding is applied explicitly, so building a model never needs a mesh in scope.
flax.config.update("flax_always_shard_variable", False)

__version__ = "0.1.0"
