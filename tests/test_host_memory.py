"""The glibc settings of `jaxground.host_memory`: a jitted function whose temporaries need a large block stops
page-faulting it in on every call."""

import os
import platform
import subprocess
import sys
import textwrap

import pytest

from jaxground import host_memory

# Three [16384, 256] float32 products: XLA:CPU asks for one temporary block of 32 MiB per call, glibc's largest
# automatic mmap threshold. With the settings the heap settles after some calls and stops growing.
PROBE = textwrap.dedent("""
    import resource, sys
    from jaxground import host_memory
    host_memory.keep_freed_memory()
    print(host_memory.applied)
    import jax, jax.numpy as jnp

    @jax.jit
    def f(x, w):
        a = x @ w
        b = a @ w
        c = b @ w
        return (a * c).sum() + b.sum()

    x, w = jnp.ones((16384, 256), jnp.float32), jnp.eye(256, dtype=jnp.float32)
    temp = f.lower(x, w).compile().memory_analysis().temp_size_in_bytes
    windows = []
    for _ in range(8):  # calls in windows of 5: the fewest faults per call of any window
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        for _ in range(5):
            f(x, w).block_until_ready()
        windows.append((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 5)
    print(temp, min(windows))
""")


def _faults_per_call(setting: str) -> tuple[bool, int, float]:
    env = os.environ | {"JAXGROUND_MALLOC": setting}
    out = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, check=True)
    applied, sizes = out.stdout.split("\n")[:2]
    temp, faults = sizes.split()
    return applied == "True", int(temp), float(faults)


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="the settings are glibc's")
def test_kept_memory_is_not_faulted_in_again():
    applied, temp, default_faults = _faults_per_call("default")
    assert not applied
    assert default_faults > 0.5 * temp / 4096  # by default most of the block is faulted in on every call
    applied, _, kept_faults = _faults_per_call("keep")
    assert applied
    assert kept_faults < 0.05 * default_faults


def test_default_and_bad_setting(monkeypatch, capsys):
    monkeypatch.delenv("JAXGROUND_MALLOC", raising=False)
    host_memory.keep_freed_memory()
    assert host_memory.applied is False
    monkeypatch.setenv("JAXGROUND_MALLOC", "yes")
    with pytest.raises(SystemExit) as stop:
        host_memory.keep_freed_memory()
    assert stop.value.code == 2 and "'default' or 'keep'" in capsys.readouterr().err
