"""`jaxground.host_memory`: under each JAXGROUND_MALLOC setting, a jitted function whose temporaries need a large
block is faulted in as glibc's defaults would (`glibc`), 2 MiB at a time (`hugepages`, the default) or not again
at all (`keep`)."""

import os
import subprocess
import sys
import textwrap

import pytest

from jaxground import host_memory

# Three [16384, 256] float32 products: XLA:CPU asks for one temporary block of 32 MiB per call, glibc's largest
# automatic mmap threshold. `configure(True)` may re-execute this script, as `jaxground` re-executes itself.
PROBE = textwrap.dedent("""
    import resource, sys
    from jaxground import host_memory
    host_memory.configure(command_line=True)
    print(host_memory.state)
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

glibc = host_memory._glibc_version()


def _faults_per_call(setting: str) -> tuple[str, int, float]:
    env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"} | {"JAXGROUND_MALLOC": setting}
    out = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, check=True)
    state, sizes = out.stdout.split("\n")[:2]
    temp, faults = sizes.split()
    return state, int(temp), float(faults)


@pytest.fixture(scope="module")
def glibc_faults():
    if glibc is None:
        pytest.skip("the settings are glibc's")
    state, temp, faults = _faults_per_call("glibc")
    assert state == "glibc's own settings"
    assert faults > 0.5 * temp / 4096  # most of the block is faulted in, 4 KiB at a time, on every call
    return faults


def test_kept_memory_is_not_faulted_in_again(glibc_faults):
    state, _, faults = _faults_per_call("keep")
    assert state == "keep in effect"
    assert faults < 0.05 * glibc_faults


@pytest.mark.skipif(glibc is not None and glibc < (2, 35), reason="glibc.malloc.hugetlb needs glibc >= 2.35")
@pytest.mark.skipif(host_memory._thp_mode() not in ("madvise", "always"), reason="the kernel's THP are off")
def test_huge_pages_are_the_default_and_fault_in_by_the_2mib(glibc_faults):
    state, _, faults = _faults_per_call("hugepages")
    assert state == "hugepages in effect: GLIBC_TUNABLES sets glibc.malloc.hugetlb=1"  # after re-executing
    # 16 faults of 2 MiB would do for the block, but the kernel falls back to 4 KiB pages where it finds no free
    # 2 MiB page: 561 against 8,195 faults per call under the parallel suite, so a 4x margin, not 20x.
    assert faults < 0.25 * glibc_faults
    env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "JAXGROUND_MALLOC")}
    out = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.startswith(state)


def test_in_process_and_bad_setting(monkeypatch, capsys):
    monkeypatch.delenv("JAXGROUND_MALLOC", raising=False)
    monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
    host_memory.configure(command_line=False)  # must not re-execute pytest
    assert "not in effect" in host_memory.state
    monkeypatch.setenv("JAXGROUND_MALLOC", "yes")
    with pytest.raises(SystemExit) as stop:
        host_memory.configure(command_line=False)
    assert stop.value.code == 2 and "hugepages, keep, glibc" in capsys.readouterr().err
