"""The generation and worker-slot state tables: every state x event pair, allowed or refused."""

from __future__ import annotations

import itertools
from collections.abc import Iterable
from enum import Enum
from typing import TypeVar

import pytest

from swapd.supervisor.lifecycle import (
    FINAL,
    SERVING,
    SLOT_TRANSITIONS,
    TRANSITIONS,
    GenEvent,
    GenState,
    IllegalTransition,
    SlotEvent,
    SlotState,
    next_slot_state,
    next_state,
)

G, E = GenState, GenEvent
S, W = SlotState, SlotEvent

# Written out again on purpose: a change to the table must be a change to this test too.
GEN_ALLOWED: dict[tuple[GenState, GenEvent], GenState] = {
    (G.STARTING, E.READY): G.STANDBY,
    (G.STARTING, E.FAIL): G.FAILED,
    (G.STANDBY, E.COMMIT): G.ACTIVE,
    (G.STANDBY, E.FAIL): G.FAILED,
    (G.ACTIVE, E.QUIESCE): G.QUIESCED,
    (G.ACTIVE, E.SUPERSEDE): G.DRAINING,
    (G.QUIESCED, E.RESUME): G.ACTIVE,
    (G.QUIESCED, E.SUPERSEDE): G.DRAINING,
    (G.DRAINING, E.EXITED): G.EXITED,
}

SLOT_ALLOWED: dict[tuple[SlotState, SlotEvent], SlotState] = {
    (S.STARTING, W.READY): S.READY,
    (S.STARTING, W.DIED): S.BACKOFF,
    (S.STARTING, W.DRAIN): S.DRAINING,
    (S.READY, W.DRAIN): S.DRAINING,
    (S.READY, W.DIED): S.BACKOFF,
    (S.BACKOFF, W.RESPAWN): S.EXITED,
    (S.BACKOFF, W.DRAIN): S.EXITED,
    (S.DRAINING, W.EXITED): S.EXITED,
    (S.DRAINING, W.DIED): S.EXITED,
}

GEN_PAIRS = list(itertools.product(GenState, GenEvent))
SLOT_PAIRS = list(itertools.product(SlotState, SlotEvent))


def _id(pair: tuple[Enum, Enum]) -> str:
    return f"{pair[0].value}-{pair[1].value}"


@pytest.mark.parametrize("pair", GEN_PAIRS, ids=[_id(p) for p in GEN_PAIRS])
def test_generation_state_event_pair(pair: tuple[GenState, GenEvent]) -> None:
    state, event = pair
    if pair in GEN_ALLOWED:
        assert next_state(state, event) is GEN_ALLOWED[pair]
    else:
        with pytest.raises(IllegalTransition) as info:
            next_state(state, event)
        assert str(info.value) == f"generation cannot go from {state.value} on {event.value}"
        assert info.value.__cause__ is None and info.value.__suppress_context__


@pytest.mark.parametrize("pair", SLOT_PAIRS, ids=[_id(p) for p in SLOT_PAIRS])
def test_slot_state_event_pair(pair: tuple[SlotState, SlotEvent]) -> None:
    state, event = pair
    if pair in SLOT_ALLOWED:
        assert next_slot_state(state, event) is SLOT_ALLOWED[pair]
    else:
        with pytest.raises(IllegalTransition) as info:
            next_slot_state(state, event)
        assert str(info.value) == f"worker cannot go from {state.value} on {event.value}"


def test_tables_are_exactly_the_documented_ones() -> None:
    assert TRANSITIONS == GEN_ALLOWED
    assert SLOT_TRANSITIONS == SLOT_ALLOWED


def test_illegal_transition_is_a_runtime_error() -> None:
    # Callers treat it as a bug (RuntimeError), never as an operator-facing ValueError.
    assert issubclass(IllegalTransition, RuntimeError)
    assert not issubclass(IllegalTransition, ValueError)


def test_serving_and_final_sets() -> None:
    assert frozenset({G.STANDBY, G.ACTIVE}) == SERVING
    assert frozenset({G.EXITED, G.FAILED}) == FINAL
    assert not SERVING & FINAL


K = TypeVar("K", GenState, SlotState)


def _reachable(table: Iterable[tuple[tuple[K, Enum], K]], start: K) -> set[K]:
    edges = list(table)
    seen, todo = {start}, [start]
    while todo:
        state = todo.pop()
        for (src, _), dst in edges:
            if src is state and dst not in seen:
                seen.add(dst)
                todo.append(dst)
    return seen


def test_every_generation_state_is_reachable_from_starting() -> None:
    assert _reachable(TRANSITIONS.items(), G.STARTING) == set(GenState)


def test_every_generation_state_can_end() -> None:
    for state in GenState:
        assert _reachable(TRANSITIONS.items(), state) & FINAL, state


def test_final_generation_states_go_nowhere_else() -> None:
    for (src, _), dst in TRANSITIONS.items():
        if src in FINAL:
            assert dst is src  # FAILED absorbs the exit of its last worker


def test_a_stateful_swap_can_abort_and_be_retried() -> None:
    # The old generation survives an aborted handoff, and can hand over again later.
    state = G.ACTIVE
    for event in (E.QUIESCE, E.RESUME, E.QUIESCE, E.SUPERSEDE, E.EXITED):
        state = next_state(state, event)
    assert state is G.EXITED


def test_a_generation_never_serves_again_once_draining() -> None:
    assert not _reachable(TRANSITIONS.items(), G.DRAINING) & SERVING


def test_every_slot_state_is_reachable_and_ends_exited() -> None:
    assert _reachable(SLOT_TRANSITIONS.items(), S.STARTING) == set(SlotState)
    for state in SlotState:
        assert S.EXITED in _reachable(SLOT_TRANSITIONS.items(), state)
    assert not [pair for pair in SLOT_TRANSITIONS if pair[0] is S.EXITED]
