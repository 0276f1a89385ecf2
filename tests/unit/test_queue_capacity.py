"""The queue policy's count model (``Capacity``): its indexes and kept answers stay true.

``fit`` walks nodes by free count and ``victims_for`` keeps each node's answer
until the node changes; after any sequence of starts and stops both must answer
as the plain definitions do (best fit by spare GPUs then name; victims searched
afresh with an explicit eligibility rule).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

from hypothesis import given, settings
from hypothesis import strategies as st

from scheduler.core.queue_policy import Capacity, Held


def best_fit(cap: Capacity, gpus: int, nodes: int, limit: dict[str, int]) -> tuple[str, ...]:
    """The definition: the ``nodes`` nodes with the fewest usable GPUs to spare, then by name."""
    usable = {n: min(f, limit[n]) if n in limit else f for n, f in cap.free.items()}
    fitting = sorted((u - gpus, n) for n, u in usable.items() if u >= gpus)
    return () if len(fitting) < nodes else tuple(sorted(n for _, n in fitting[:nodes]))


def below(rank: int) -> Callable[[Held, Mapping[str, int]], bool]:
    """The plain eligibility rule ``victims_for(eligible=None)`` stands for."""
    return lambda h, _: h.victim and h.rank < rank


@st.composite
def steps(draw: st.DrawFn) -> tuple[dict[str, int], list[tuple[str, int, int, int, bool]]]:
    node_gpus = {f"n{i}": draw(st.sampled_from([4, 8])) for i in range(draw(st.integers(1, 5)))}
    ops = draw(
        st.lists(
            st.tuples(
                st.sampled_from(["add", "remove", "fit", "victims"]),
                st.integers(0, 8),  # GPUs
                st.integers(1, 2),  # nodes
                st.integers(-2, 2),  # rank
                st.booleans(),  # may be a victim / use a limit
            ),
            max_size=40,
        )
    )
    return node_gpus, ops


@settings(max_examples=300, deadline=None)
@given(steps())
def test_fit_and_victims_match_their_definitions_after_any_changes(
    case: tuple[dict[str, int], list[tuple[str, int, int, int, bool]]],
) -> None:
    node_gpus, ops = case
    cap = Capacity(node_gpus, ())
    names = sorted(node_gpus)
    held: list[Held] = []
    for i, (op, gpus, nodes, rank, flag) in enumerate(ops):
        if op == "add":
            fit = cap.fit(max(1, gpus), 1) or (names[i % len(names)],)  # over-commit too
            h = Held(f"j{i}", "t", max(1, gpus), fit, rank, float(i), 0.0, flag)
            cap.add(h)
            held.append(h)
        elif op == "remove" and held:
            cap.remove(held.pop(i % len(held)))
        elif op == "fit":
            limit = {names[i % len(names)]: gpus // 2} if flag else {}
            assert cap.fit(gpus, nodes, limit or None) == best_fit(cap, gpus, nodes, limit)
        elif op == "victims":
            allowed = (lambda n: n != names[0]) if flag else (lambda n: True)
            kept = cap.victims_for(gpus, nodes, None, allowed, rank)
            fresh = cap.victims_for(gpus, nodes, below(rank), allowed)
            assert (kept is None) == (fresh is None)
            if kept is not None and fresh is not None:
                assert kept[0] == fresh[0]
                assert sorted(h.job_id for h in kept[1]) == sorted(h.job_id for h in fresh[1])
