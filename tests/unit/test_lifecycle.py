"""The generation and worker-slot lifecycles, as behaviour: the sequences of events a swap,
an abort, a crash or a stop produce, the states they must lead to, and the events that must
be refused (a bug in the supervisor, raised as IllegalTransition) at each point."""

from __future__ import annotations

from collections.abc import Iterable

import pytest

from swapd.supervisor.lifecycle import (
    FINAL,
    SERVING,
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


def run(events: Iterable[GenEvent], state: GenState = G.STARTING) -> list[GenState]:
    """Apply events in order; the states passed through (after each event)."""
    seen = []
    for event in events:
        state = next_state(state, event)
        seen.append(state)
    return seen


def run_slot(events: Iterable[SlotEvent], state: SlotState = S.STARTING) -> list[SlotState]:
    seen = []
    for event in events:
        state = next_slot_state(state, event)
        seen.append(state)
    return seen


# -- what a swap does to the two generations --------------------------------------------


def test_stateless_swap() -> None:
    # new: spawned, every worker ready, committed, later superseded and drained away
    assert run([E.READY, E.COMMIT, E.SUPERSEDE, E.EXITED]) == [
        G.STANDBY, G.ACTIVE, G.DRAINING, G.EXITED]
    # old, at that commit: draining at once, never serving again
    assert run([E.SUPERSEDE, E.EXITED], G.ACTIVE) == [G.DRAINING, G.EXITED]


def test_stateful_swap_that_commits() -> None:
    # old: quiesced for the snapshot, then superseded by the commit
    assert run([E.QUIESCE, E.SUPERSEDE, E.EXITED], G.ACTIVE) == [
        G.QUIESCED, G.DRAINING, G.EXITED]


def test_stateful_swap_that_aborts_leaves_the_old_generation_active_and_swappable_again() -> None:
    states = run([E.QUIESCE, E.RESUME, E.QUIESCE, E.RESUME, E.QUIESCE, E.SUPERSEDE], G.ACTIVE)
    assert states == [G.QUIESCED, G.ACTIVE, G.QUIESCED, G.ACTIVE, G.QUIESCED, G.DRAINING]
    # and the successor that failed ends FAILED, from either side of readiness
    assert run([E.FAIL]) == [G.FAILED]
    assert run([E.READY, E.FAIL]) == [G.STANDBY, G.FAILED]


def test_stop_supersedes_an_active_or_quiesced_generation() -> None:
    assert run([E.SUPERSEDE], G.ACTIVE) == [G.DRAINING]
    assert run([E.SUPERSEDE], G.QUIESCED) == [G.DRAINING]


# -- the watch window: the old generation held for a rollback --------------------------------


def test_watch_window_that_passes() -> None:
    # old, stateless: held at the successor's commit, drained when the window ends
    assert run([E.HOLD, E.SUPERSEDE, E.EXITED], G.ACTIVE) == [G.HELD, G.DRAINING, G.EXITED]
    # old, stateful: quiesced for the snapshot, then held instead of drained
    assert run([E.QUIESCE, E.HOLD, E.SUPERSEDE], G.ACTIVE) == [
        G.QUIESCED, G.HELD, G.DRAINING]


def test_stateless_rollback_revives_the_held_generation() -> None:
    assert run([E.HOLD, E.REVIVE], G.ACTIVE) == [G.HELD, G.ACTIVE]
    # the watched one drains; the revived one can be swapped (and held) again
    assert run([E.SUPERSEDE], G.ACTIVE) == [G.DRAINING]
    assert run([E.HOLD, E.REVIVE, E.QUIESCE, E.HOLD, E.REVIVE], G.ACTIVE) == [
        G.HELD, G.ACTIVE, G.QUIESCED, G.HELD, G.ACTIVE]


def test_stateful_rollback_hands_the_state_back_or_is_refused() -> None:
    # watched: quiesced to snapshot what was written since commit, then superseded ...
    assert run([E.QUIESCE, E.SUPERSEDE], G.ACTIVE) == [G.QUIESCED, G.DRAINING]
    # ... or, when the held code refuses that state, it resumes and keeps serving
    assert run([E.QUIESCE, E.RESUME], G.ACTIVE) == [G.QUIESCED, G.ACTIVE]
    # and the held one is then let go rather than revived
    assert run([E.QUIESCE, E.HOLD, E.SUPERSEDE], G.ACTIVE)[-1] == G.DRAINING


def test_stop_drains_a_held_generation() -> None:
    assert run([E.HOLD, E.SUPERSEDE, E.EXITED], G.ACTIVE)[-1] == G.EXITED


def test_a_held_generation_does_not_serve() -> None:
    assert G.HELD not in SERVING and G.HELD not in FINAL


def test_serving_states_are_where_workers_may_accept() -> None:
    assert set(SERVING) == {G.STANDBY, G.ACTIVE}
    assert set(FINAL) == {G.EXITED, G.FAILED}


# -- what must be refused -----------------------------------------------------------------


@pytest.mark.parametrize(("events", "start"), [
    ([E.COMMIT], G.STARTING),  # committing a generation that is not ready
    ([E.QUIESCE], G.STANDBY),  # a successor is never the one handing state over
    ([E.RESUME], G.ACTIVE),  # a resume without a quiesce
    ([E.READY, E.COMMIT, E.COMMIT], G.STARTING),  # committed twice
    ([E.SUPERSEDE, E.RESUME], G.ACTIVE),  # nothing brings a draining generation back
    ([E.SUPERSEDE, E.COMMIT], G.ACTIVE),
    ([E.SUPERSEDE, E.QUIESCE], G.ACTIVE),
    ([E.FAIL, E.READY], G.STARTING),  # a failed generation stays failed
    ([E.FAIL, E.COMMIT], G.STARTING),
    ([E.FAIL, E.SUPERSEDE], G.STARTING),
    ([E.SUPERSEDE, E.EXITED, E.SUPERSEDE], G.ACTIVE),  # nothing after the end
    ([E.EXITED], G.ACTIVE),  # an active generation is superseded before it exits
    ([E.FAIL], G.ACTIVE),  # after commit a crash is a restart, not a failed swap
    ([E.HOLD], G.STANDBY),  # only a generation that served can be held for a rollback
    ([E.REVIVE], G.ACTIVE),  # revive is for a held generation only
    ([E.SUPERSEDE, E.REVIVE], G.ACTIVE),  # a draining generation is never revived
    ([E.HOLD, E.RESUME], G.ACTIVE),  # a held generation comes back by revive, not resume
    ([E.HOLD, E.QUIESCE], G.ACTIVE),  # nor is it quiesced (it is not serving)
    ([E.HOLD, E.COMMIT], G.ACTIVE),
    ([E.HOLD, E.HOLD], G.ACTIVE),
    ([E.HOLD, E.EXITED], G.ACTIVE),  # a held generation is superseded before it exits
], ids=lambda v: "-".join(e.value for e in v) if isinstance(v, list) else v.value)
def test_refused(events: list[GenEvent], start: GenState) -> None:
    *before, last = events
    state = run(before, start)[-1] if before else start
    with pytest.raises(IllegalTransition) as info:
        next_state(state, last)
    assert str(info.value) == f"generation cannot go from {state.value} on {last.value}"
    assert isinstance(info.value, RuntimeError)  # a bug, never an operator-facing ValueError


def test_final_states_take_no_event() -> None:
    for state in FINAL:
        for event in GenEvent:
            with pytest.raises(IllegalTransition):
                next_state(state, event)


# -- worker slots ---------------------------------------------------------------------------


def test_slot_serves_then_drains() -> None:
    assert run_slot([W.READY, W.DRAIN, W.EXITED]) == [S.READY, S.DRAINING, S.EXITED]


def test_slot_crash_is_a_backoff_then_a_new_process() -> None:
    # ready, crashes (its generation restarts it): this record ends when a new one takes over
    assert run_slot([W.READY, W.DIED, W.RESPAWN]) == [S.READY, S.BACKOFF, S.EXITED]
    assert run_slot([W.DIED]) == [S.BACKOFF]  # died before it was ready


def test_slot_told_to_go_while_starting_or_in_backoff() -> None:
    assert run_slot([W.DRAIN, W.DIED]) == [S.DRAINING, S.EXITED]  # killed: an exit
    assert run_slot([W.DIED, W.DRAIN]) == [S.BACKOFF, S.EXITED]  # its generation gave up


@pytest.mark.parametrize(("events", "start"), [
    ([W.EXITED], S.READY),  # exited without being told: that is DIED
    ([W.RESPAWN], S.READY),  # only a slot in backoff is respawned
    ([W.DRAIN, W.READY], S.STARTING),  # a draining worker never becomes ready again
    ([W.DRAIN, W.EXITED, W.DIED], S.STARTING),  # nothing after the end
])
def test_slot_refused(events: list[SlotEvent], start: SlotState) -> None:
    *before, last = events
    state = run_slot(before, start)[-1] if before else start
    with pytest.raises(IllegalTransition, match=f"worker cannot go from {state.value}"):
        next_slot_state(state, last)
