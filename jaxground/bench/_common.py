"""Shared pieces of the training benchmarks: timing, model FLOPs of a NExT-Chat step, the machine and its matmul peak."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import resource
import statistics
import time


class BenchError(ValueError):
    """A benchmark option it cannot run with: `jaxground bench NAME: message` on stderr, exit status 2."""


def timed(fn, repeats: int, warmup: int = 1) -> float:
    """Seconds per call of fn(), after `warmup` calls."""
    for _ in range(warmup):
        fn()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats


@dataclasses.dataclass
class Rounds:
    """What `alternated` measured: per variant, the seconds per call of each round and the minor page faults per
    timed call."""

    seconds: dict  # name -> [seconds per call, one per round]
    faults: dict  # name -> minor page faults per timed call

    def median(self, name: str) -> float:
        """Seconds per call of `name`: the median of its rounds."""
        return statistics.median(self.seconds[name])

    def ratio(self, name: str, over: str) -> str:
        """How many times faster `over` ran than `name`: the median of the per-round ratios, and their range when
        there are several rounds, "1.52x (1.33-1.84)"."""
        per_round = sorted(t / o for t, o in zip(self.seconds[name], self.seconds[over]))
        text = f"{statistics.median(per_round):.2f}x"
        return text + (f" ({per_round[0]:.2f}-{per_round[-1]:.2f})" if len(per_round) > 1 else "")


def alternated(fns: dict, rounds: int, repeats: int, min_seconds: float = 0.0) -> Rounds:
    """Times the callables of `fns` in turn, round after round: each round runs every one once untimed (the other's
    threads and caches settle) and then timed, `repeats` calls and at least `min_seconds`. A load that drifts over
    the run falls on every framework alike, where timing one framework's calls after the other's put it all on one
    side."""
    seconds = {name: [] for name in fns}
    faults, calls = dict.fromkeys(fns, 0), dict.fromkeys(fns, 0)
    for _ in range(rounds):
        for name, fn in fns.items():
            fn()
            with minor_faults() as count:
                start, n = time.perf_counter(), 0
                while n < repeats or time.perf_counter() - start < min_seconds:
                    fn()
                    n += 1
                seconds[name].append((time.perf_counter() - start) / n)
            faults[name] += count[0]
            calls[name] += n
    return Rounds(seconds, {name: faults[name] / calls[name] for name in fns})


@contextlib.contextmanager
def minor_faults():
    """Yields a one-item list that holds, after the block, the process's minor page faults during it."""
    count = [0]
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    try:
        yield count
    finally:
        count[0] = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before


def param_count(tree) -> int:
    import jax

    return sum(int(x.size) for x in jax.tree.leaves(tree))


def step_flops(cfg, model_state, batch: int, seq: int, *, llm_trained: bool, vision_trained: bool = False,
               triggers: int = 8, head_tokens: int | None = None) -> float:
    """Model FLOPs of one NExT-Chat train step: matmuls, counted analytically (the recompute of remat is not
    counted; attention is counted over all T^2 pairs, as computed). A trained part costs 3x its forward
    (forward + two backward matmuls), a frozen one 1x. `model_state`: the model's nnx.State (abstract is fine).

    - LLM forward: 2 * (params - input embedding table) * tokens + 4 * T^2 * D per layer and sequence, the LM
      head's share counted at `head_tokens` positions per sequence (default all T; `train.label_tokens`);
    - CLIP: 2 * params * patches + 4 * P^2 * Dv per layer run (`select_layer` -2 skips the last layer);
    - projector: 2 * params * patches; box encoder/decoder: 2 * params per box (negligible);
    - SAM image encoder (frozen, stage 3): 2 * params * g^2 + attention over 14x14 windows and the global
      blocks; mask head (trained): 3 * 2 * params * g^2 per trigger (its two-way transformer reads every
      image token).
    """
    llm, vis = cfg.llm, cfg.vision
    groups = {name: param_count(model_state[name]) for name in model_state}
    head_dim = llm.head_dim or llm.hidden_size // llm.num_heads
    llm_mm = groups["llm"] - llm.vocab_size * llm.hidden_size  # the input embedding is a gather
    head = llm.vocab_size * llm.hidden_size
    llm_fwd = 2 * (llm_mm - head) * seq + 2 * head * (seq if head_tokens is None else head_tokens)
    llm_fwd += llm.num_layers * 4 * seq * seq * llm.num_heads * head_dim
    p, run = vis.num_patches, vis.layers_run
    vis_fwd = 2 * groups["vision"] * run / vis.num_layers * p + run * 4 * p * p * vis.hidden_size
    flops = (3 if llm_trained else 1) * (llm_fwd + 2 * groups["projector"] * p)
    flops += (3 if vision_trained else 1) * vis_fwd
    flops += 3 * 2 * (groups["loc_encoder"] + groups["loc_decoder"]) * 2 * triggers
    if cfg.sam is not None:
        s = cfg.sam
        g2, w = s.grid * s.grid, s.window_size
        windows = (-(-s.grid // w)) ** 2
        n_global = len(s.global_attn_indexes)
        attn = n_global * 4 * g2 * g2 * s.width + (s.depth - n_global) * windows * 4 * (w * w) ** 2 * s.width
        flops += 2 * groups["sam"] * g2 + attn
        flops += 3 * triggers * 2 * groups["mask_head"] * g2
    return float(batch * flops)


_SIMD = ("avx2", "fma", "avx512f", "avx512_bf16", "amx_tile", "asimd", "sve")


def machine(cpuinfo: str = "/proc/cpuinfo") -> str:
    """One line naming this host: CPU model, usable cores, the SIMD flags that set the GEMM rate, RAM, load, and
    how malloc serves XLA's temporaries (`jaxground.host_memory`; it applies to both frameworks of a run).

    Benchmark figures move with these (a host with AVX-512 BF16 runs bfloat16 GEMMs at twice float32; huge pages
    took 17-30% off the tiny train step), so every timing benchmark prints it first (`bench plan` only
    compiles, so it does not).
    """
    from jaxground import host_memory

    model, flags = "unknown CPU", set()
    with contextlib.suppress(OSError), open(cpuinfo) as f:
        for line in f:
            key, _, value = line.partition(":")
            key = key.strip()
            if key in ("model name", "Model", "cpu model") and model == "unknown CPU":
                model = value.strip()
            elif key in ("flags", "Features") and not flags:
                flags = set(value.split())
    simd = [name for name in _SIMD if name in flags]
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return (f"{model}, {len(os.sched_getaffinity(0))} usable cores, SIMD {' '.join(simd) or 'none listed'}, "
            f"{ram:.1f} GiB RAM, load average {os.getloadavg()[0]:.2f}; "
            f"JAXGROUND_MALLOC={host_memory.requested()} ({host_memory.state})")


def jax_matmul_rate(n: int = 2048, repeats: int = 5, rounds: int = 3) -> float:
    """The float32 rate of a jitted [n,n] @ [n,n] in JAX, FLOP/s: the best of `rounds` means of `repeats` calls (a
    peak, so a slow moment of a shared host does not lower it)."""
    import jax
    import jax.numpy as jnp

    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
    b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
    mm = jax.jit(lambda x, y: jnp.dot(x, y, precision="highest"))
    seconds = min(timed(lambda: jax.block_until_ready(mm(a, b)), repeats, warmup=2) for _ in range(rounds))
    return 2 * n**3 / seconds


def torch_matmul_rate(n: int = 2048, repeats: int = 5, rounds: int = 3) -> float:
    """The same float32 matmul in torch eager, FLOP/s, the best of `rounds` likewise."""
    import torch

    a, b = torch.randn(n, n), torch.randn(n, n)
    return 2 * n**3 / min(timed(lambda: torch.mm(a, b), repeats, warmup=2) for _ in range(rounds))
