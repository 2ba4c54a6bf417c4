"""`bench._common.minor_faults` counts the page faults of the block it wraps."""

from jaxground.bench._common import minor_faults


def test_counts_the_pages_a_block_touches_first():
    with minor_faults() as idle:
        pass
    with minor_faults() as touched:
        block = bytearray(64 << 20)  # a fresh mapping (not numpy's, which asks for huge pages)
        block[::4096] = b"\x01" * (len(block) // 4096)  # one byte written in each of its 16,384 pages
    assert touched[0] > 8_000 > idle[0]
