"""`bench._common.minor_faults` counts the page faults of the block it wraps."""

import mmap

from jaxground.bench._common import minor_faults


def test_counts_the_pages_a_block_touches_first():
    with minor_faults() as idle:
        pass
    # An anonymous mapping of its own, in 4 KiB pages: a bytearray may reuse heap memory the process touched
    # before (CI saw 0 faults) and numpy's buffers ask for huge pages.
    block = mmap.mmap(-1, 64 << 20)
    block.madvise(mmap.MADV_NOHUGEPAGE)
    with minor_faults() as touched:
        block[::4096] = b"\x01" * (len(block) // 4096)  # one byte written in each of its 16,384 pages
    block.close()
    assert touched[0] > 8_000 > idle[0]
