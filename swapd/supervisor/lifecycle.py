"""The generation state table: the only place that decides a generation's next state.

Pure data and one function, no I/O (the shape of h11's `_state.py`):

    STARTING ──ready──▶ STANDBY ──commit──▶ ACTIVE ──superseded──▶ DRAINING ──exited──▶ EXITED
        │                  │                  │  ▲                     ▲  ▲
        └──failed──────────┴────▶ FAILED      │  └──resume── QUIESCED ─┘  │ superseded
                                              └──quiesce──▶ QUIESCED      │ (window over)
                                       ACTIVE or QUIESCED ──hold──▶ HELD ─┘
                                                    ACTIVE ◀──revive── HELD

- stateless swap: new STARTING → STANDBY → ACTIVE (commit); old ACTIVE → DRAINING.
- stateful swap: old ACTIVE → QUIESCED (stopped accepting, snapshotted); then either
  the new one commits (old QUIESCED → DRAINING) or the swap aborts (old → ACTIVE).
- stop: ACTIVE, QUIESCED or HELD → DRAINING; a generation still starting is FAILED.
- watch window (`--watch`): at the successor's commit the old generation is HELD instead
  of DRAINING: it accepts nothing but keeps its processes and state. A rollback revives
  it (HELD → ACTIVE; the watched generation drains, or in stateful mode first quiesces to
  hand its state back, and resumes if the held code refuses that state); the end of the
  window supersedes it (HELD → DRAINING). A held generation is never quiesced, committed
  or resumed: revive is its only way back to serving.

Worker slots have their own, smaller table (`SLOT_TRANSITIONS`): a worker that
dies while its generation is ACTIVE is restarted in the same slot.
"""

from __future__ import annotations

import enum


class GenState(enum.Enum):
    STARTING = "starting"
    STANDBY = "standby"
    ACTIVE = "active"
    QUIESCED = "quiesced"
    HELD = "held"  # superseded under a watch window: not accepting, kept for a rollback
    DRAINING = "draining"
    EXITED = "exited"
    FAILED = "failed"


class GenEvent(enum.Enum):
    READY = "ready"  # every worker of the generation is ready (or standing by for state)
    COMMIT = "commit"  # point of no return: this generation serves
    FAIL = "fail"  # a worker died, timed out, refused state, or the swap was aborted
    QUIESCE = "quiesce"  # a stateful successor is about to take the state
    RESUME = "resume"  # the successor aborted: serve again with the untouched state
    SUPERSEDE = "supersede"  # a successor committed, the watch window ended, or a stop
    HOLD = "hold"  # a successor committed under a watch window: keep this one for a rollback
    REVIVE = "revive"  # rollback: the held generation serves again
    EXITED = "exited"  # the last worker is gone


class IllegalTransition(RuntimeError):
    """A lifecycle event that the table does not allow in the current state: a bug."""


TRANSITIONS: dict[tuple[GenState, GenEvent], GenState] = {
    (GenState.STARTING, GenEvent.READY): GenState.STANDBY,
    (GenState.STARTING, GenEvent.FAIL): GenState.FAILED,
    (GenState.STANDBY, GenEvent.COMMIT): GenState.ACTIVE,
    (GenState.STANDBY, GenEvent.FAIL): GenState.FAILED,
    (GenState.ACTIVE, GenEvent.QUIESCE): GenState.QUIESCED,
    (GenState.ACTIVE, GenEvent.SUPERSEDE): GenState.DRAINING,
    (GenState.QUIESCED, GenEvent.RESUME): GenState.ACTIVE,
    (GenState.QUIESCED, GenEvent.SUPERSEDE): GenState.DRAINING,
    (GenState.ACTIVE, GenEvent.HOLD): GenState.HELD,
    (GenState.QUIESCED, GenEvent.HOLD): GenState.HELD,
    (GenState.HELD, GenEvent.REVIVE): GenState.ACTIVE,
    (GenState.HELD, GenEvent.SUPERSEDE): GenState.DRAINING,
    (GenState.DRAINING, GenEvent.EXITED): GenState.EXITED,
}

# States in which a generation's workers may be accepting connections.
SERVING = frozenset({GenState.STANDBY, GenState.ACTIVE})
# States after which nothing more happens to a generation.
FINAL = frozenset({GenState.EXITED, GenState.FAILED})


def next_state(state: GenState, event: GenEvent) -> GenState:
    try:
        return TRANSITIONS[(state, event)]
    except KeyError:
        raise IllegalTransition(
            f"generation cannot go from {state.value} on {event.value}"
        ) from None


class SlotState(enum.Enum):
    STARTING = "starting"  # exec'd, not ready yet
    READY = "ready"  # announced readiness (serving, or standing by for state)
    DRAINING = "draining"  # told to finish and exit
    BACKOFF = "backoff"  # died unasked; restarted later if its generation is active
    EXITED = "exited"


class SlotEvent(enum.Enum):
    READY = "ready"
    DRAIN = "drain"
    DIED = "died"  # exited while it should be running
    RESPAWN = "respawn"  # a new process takes over the slot; this record is done
    EXITED = "exited"  # exited after being told to


SLOT_TRANSITIONS: dict[tuple[SlotState, SlotEvent], SlotState] = {
    (SlotState.STARTING, SlotEvent.READY): SlotState.READY,
    (SlotState.STARTING, SlotEvent.DIED): SlotState.BACKOFF,
    (SlotState.STARTING, SlotEvent.DRAIN): SlotState.DRAINING,
    (SlotState.READY, SlotEvent.DRAIN): SlotState.DRAINING,
    (SlotState.READY, SlotEvent.DIED): SlotState.BACKOFF,
    (SlotState.BACKOFF, SlotEvent.RESPAWN): SlotState.EXITED,
    (SlotState.BACKOFF, SlotEvent.DRAIN): SlotState.EXITED,  # give up on the slot
    (SlotState.DRAINING, SlotEvent.EXITED): SlotState.EXITED,
    (SlotState.DRAINING, SlotEvent.DIED): SlotState.EXITED,
}


def next_slot_state(state: SlotState, event: SlotEvent) -> SlotState:
    try:
        return SLOT_TRANSITIONS[(state, event)]
    except KeyError:
        raise IllegalTransition(f"worker cannot go from {state.value} on {event.value}") from None
