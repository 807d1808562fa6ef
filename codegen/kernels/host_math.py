"""Integer helpers for host-side launch code (grids, block sizes, tuning buckets).

triton.cdiv and triton.next_power_of_2 are ConstexprFunctions in Triton 3.6: ~2.5 us a call through their
dispatch, paid several times per op call in eager code and CUDA-graph recordings.  These give the same numbers
(tests/test_autotune.py) for plain ints.  A leaf module: codegen/kernels/epilogue.py needs cdiv too and is
imported by common.py."""

from __future__ import annotations


def cdiv(a: int, b: int) -> int:
    """ceil(a / b)."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """The smallest power of two >= n (0 for 0), as triton.next_power_of_2."""
    return 0 if n <= 0 else 1 << (n - 1).bit_length()
