"""The process-wide buffered-bytes budget on its own (edge/budget.py)."""

from __future__ import annotations

from proxy.edge.budget import Budget


class Waiter:
    def __init__(self, need: int) -> None:
        self.need = need
        self.got: list[int] = []

    def room_needed(self) -> int:
        return self.need

    def admitted(self, size: int) -> None:
        self.got.append(size)


def budget(limit: int = 1000) -> tuple[Budget, list[str]]:
    calls: list[str] = []
    return Budget(limit, lambda: calls.append("full"), lambda: calls.append("room")), calls


def test_full_at_the_limit_and_room_again_only_below_three_quarters():
    b, calls = budget()
    b.take(600)
    b.take(400)
    assert b.full and calls == ["full"]
    b.take(10)
    b.give(200)   # 810: below the limit but above three quarters
    assert b.full and calls == ["full"]
    b.give(60)    # 750
    assert not b.full and calls == ["full", "room"]


def test_a_body_that_fits_is_reserved_at_once():
    b, _ = budget()
    assert b.reserve(Waiter(300), 300) and b.used == 300


def test_reservations_are_first_come_first_served():
    b, _ = budget()
    b.take(800)
    big, small = Waiter(500), Waiter(100)
    assert not b.reserve(big, 500)
    assert not b.reserve(small, 100), "a later small body overtook one that waits"
    b.give(400)   # 400 used: the big one fits, then the small one
    assert big.got == [500] and small.got == [100] and b.used == 1000


def test_a_waiter_that_needs_nothing_any_more_is_let_go_without_a_charge():
    b, _ = budget()
    b.take(1000)
    gone = Waiter(400)
    assert not b.reserve(gone, 400)
    gone.need = 0
    b.give(1)
    assert gone.got == [0] and b.used == 999


def test_a_forgotten_waiter_is_never_admitted():
    b, _ = budget()
    b.take(1000)
    left = Waiter(100)
    b.reserve(left, 100)
    b.forget(left)
    b.give(1000)
    assert left.got == [] and b.used == 0


def test_new_connections_are_turned_away_past_a_quarter_over_the_limit():
    b, _ = budget(1000)
    assert b.ceiling == 1250
