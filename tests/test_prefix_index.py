"""The head's prompt-cache index, alone (pure bookkeeping): the longest shared start wins, at
least MIN_REUSE tokens and never the prompt's last token; an entry a newer one extends is
handed back to be dropped; the least recently used go past the bound."""

from __future__ import annotations

from mlxring.engine.prefix import MIN_REUSE, Hit, PrefixIndex

A = list(range(100, 140))  # 40 tokens


def test_the_longest_shared_start_wins_and_the_last_token_is_left_to_compute() -> None:
    p = PrefixIndex()
    assert p.add("a", A) == ()
    assert p.add("b", [*A[:20], 7, 7, 7]) == ()
    assert p.match([*A, 1, 2]) == Hit("a", 40)
    assert p.match([*A[:25], 9]) == Hit("a", 25)
    assert p.match(A) == Hit("a", 39)  # the same prompt: all but its last token
    assert p.match([*A[:20], 7, 7, 7, 7]) == Hit("b", 23)
    assert p.match(A[: MIN_REUSE - 1] + [0, 0]) is None  # too short to be worth a copy
    assert p.match([5, *A]) is None


def test_an_extended_entry_is_handed_back_and_the_oldest_go_past_the_bound() -> None:
    p = PrefixIndex(max_entries=3)
    p.add("a", A)
    assert p.add("a2", [*A, 1, 2, 3]) == ("a",)  # a2 serves every prompt a could
    assert len(p) == 1
    for k in range(3):
        p.add(f"x{k}", [k, *A])
    assert len(p) == 3 and p.match([*A, 1, 2, 3, 4]) is None  # a2 went first (least recent)
    p.match([1, *A, 5])  # x1 used: x0 is now the least recent
    assert p.add("y", [9, *A]) == ("x0",)
    p.discard("x1")
    assert p.match([1, *A, 5]) is None
    p.clear()
    assert len(p) == 0
