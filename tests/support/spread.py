"""How evenly uniform random picks spread over instances: the bound the spread tests assert.

A test that sends ``requests`` new connections to ``instances`` instances, each picked uniformly
at random, asserts that every instance got at least ``min_count_bound(requests, instances,
FALSE_FAILURE)`` of them; a correct balancer then fails such a test with probability below
``FALSE_FAILURE``.  Used by tests/test_e2e.py and tests/test_multihost.py.
"""

from __future__ import annotations

import math

FALSE_FAILURE = 1e-6


def min_count_bound(requests: int, instances: int, false_failure: float) -> int:
    """The largest m such that, with uniform random picks, P(some instance gets < m) < bound.

    Union bound over the instances of the exact binomial lower tail: each instance's count is
    Binomial(requests, 1/instances).
    """
    p = 1 / instances

    def tail_below(m: int) -> float:
        return sum(math.comb(requests, i) * p**i * (1 - p) ** (requests - i) for i in range(m))

    best = 0
    for m in range(requests + 1):
        if instances * tail_below(m) < false_failure:
            best = m
        else:
            break
    return best
