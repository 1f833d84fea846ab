"""runtime/learn.py alone: the call order, deviations and free-run periods over plain unit indices.

No torch, no ring: `fill` counts primes, and a forward is `begin()`, one `call(i)` per unit, `end()`.
"""
from __future__ import annotations

from distorch.runtime.learn import FALLBACK, Learner


def make(n):
    primes = []
    L = Learner(n, fill=lambda: primes.append(list(L.seq)))
    return L, primes


def forward(L, order):
    """The compiled module's forward calling `order`: the positions (or FALLBACK) and whether it was ok."""
    L.depth += 1
    L.begin()
    got = [L.call(i) for i in order]
    L.depth -= 1
    return got, L.end()


def outside(L, order):
    """Calls made outside any forward (a wrapper calling the units itself)."""
    return [L.call(i) for i in order]


def test_expected_order_streams_every_call_and_positions_continue_across_forwards():
    L, primes = make(3)
    L.prime()
    assert primes == [[0, 1, 2]] and L.primed
    assert forward(L, [0, 1, 2]) == ([0, 1, 2], True)
    assert forward(L, [0, 1, 2]) == ([3, 4, 5], True)     # the ring wraps: positions keep counting
    assert L.deviations == 0 and len(primes) == 1


def test_a_deviation_falls_back_for_the_rest_of_the_forward_and_the_order_seen_is_learned():
    L, primes = make(4)
    L.prime()
    got, ok = forward(L, [0, 1, 1, 2, 3])                 # unit 1 called twice
    assert got == [0, 1, FALLBACK, FALLBACK, FALLBACK] and not ok
    assert L.deviations == 1 and L.seq == [0, 1, 1, 2, 3] and L.n == 5 and not L.primed
    got, ok = forward(L, [0, 1, 1, 2, 3])                 # primed again with the new order
    assert got == [0, 1, 2, 3, 4] and ok and primes[-1] == [0, 1, 1, 2, 3]
    got, ok = forward(L, [0, 2, 3])                       # a unit skipped
    assert got == [5, FALLBACK, FALLBACK] and not ok and L.seq == [0, 2, 3]


def test_a_short_forward_is_not_ok_but_keeps_a_subset_order():
    L, _ = make(3)
    L.prime()
    got, ok = forward(L, [0, 1])                          # ends before unit 2: learned as the new order
    assert got == [0, 1] and not ok and L.seq == [0, 1]


def test_nested_forwards_fall_back():
    L, _ = make(2)
    L.prime()
    L.depth = 1
    L.begin()
    assert L.call(0) == 0
    L.depth = 2                                           # the module called from inside itself
    assert L.call(1) == FALLBACK
    L.depth = 1
    assert not L.end() and L.seq == [0, 1]                # recorded [0, 1]: the same order


def test_calls_outside_the_forward_learn_their_period_then_stream():
    L, primes = make(3)
    L.prime()
    assert outside(L, [2, 1, 0]) == [FALLBACK] * 3        # first pass: on demand, recorded
    assert L.free_rec == [2, 1, 0] and not L.free_run
    assert outside(L, [2, 1, 0]) == [0, 1, 2]             # the first unit again: period adopted, primed
    assert L.free_run and L.seq == [2, 1, 0] and primes[-1] == [2, 1, 0]
    assert outside(L, [2, 1, 0]) == [3, 4, 5]             # the next period streams on
    # another order: learned again from the first unexpected call
    assert outside(L, [0, 1]) == [FALLBACK, FALLBACK] and L.deviations == 1 and not L.free_run
    assert outside(L, [0, 1]) == [0, 1] and L.seq == [0, 1]
    # the module's own forward takes over, primed afresh
    n_primes = len(primes)
    got, ok = forward(L, [0, 1])
    assert got == [0, 1] and ok and not L.free_run and len(primes) == n_primes + 1


def test_forget_restarts_learning_and_priming():
    L, primes = make(2)
    L.prime()
    outside(L, [0, 1])
    outside(L, [0, 1])
    assert L.free_run
    L.forget()
    assert not L.primed and not L.free_run and L.free_rec == []
    assert outside(L, [0, 1]) == [FALLBACK, FALLBACK]
    assert outside(L, [0]) == [0] and L.free_run


def test_free_record_stays_bounded_without_a_period():
    L, _ = make(1)
    for i in range(1, 500):
        L.call(i)
    assert len(L.free_rec) <= 4 * 1 + 64 + 1
