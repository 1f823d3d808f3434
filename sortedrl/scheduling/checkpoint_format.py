"""Versions of the controller checkpoint layout (`Controller.state_dict`), and the upgrade of
an older checkpoint to the current one, so a run checkpointed by earlier code goes on."""

from __future__ import annotations

from typing import Any

# Bump when the layout changes. 2: update records use the measured names
# (max_staleness_trained, ...). 3: length-aware scheduling: the settings
# submit_order and update_pacing, each group's epoch, a rank per queue entry, the length history.
# 4: each group's record_id (the length history's key when it is not the prompt id).
# 5: rollout_batch may be auto: the window-fit rule's state and the round counters.
CHECKPOINT_FORMAT = 5
_V1_UPDATE_KEYS = {
    "mean_response_len": "response_len_mean",
    "max_staleness": "max_staleness_trained",
    "mean_staleness": "mean_staleness_trained",
}


def _upgrade_v1(state: dict[str, Any]) -> dict[str, Any]:
    """Format 1 to 2: only the update records' key names changed."""
    ledger = dict(state["ledger"])
    ledger["updates"] = [
        {_V1_UPDATE_KEYS.get(k, k): v for k, v in u.items()} for u in ledger["updates"]
    ]
    return {**state, "format": 2, "ledger": ledger}


def _upgrade_v2(state: dict[str, Any]) -> dict[str, Any]:
    """Format 2 to 3: a run before the length-aware settings ran with them off (fifo queue,
    every rank 0, no pacing, no history) over one epoch."""
    config = {"submit_order": "fifo", "update_pacing": False, **state["config"]}
    groups = [{"epoch": 0, **g} for g in state["groups"]]
    queue = [[*entry, 0.0] for entry in state["queue"]]
    return {
        **state,
        "format": 3,
        "config": config,
        "groups": groups,
        "queue": queue,
        "lengths": None,
    }


def _upgrade_v3(state: dict[str, Any]) -> dict[str, Any]:
    """Format 3 to 4: every group's prompt id was its record (no record_id)."""
    groups = [{"record_id": None, **g} for g in state["groups"]]
    return {**state, "format": 4, "groups": groups}


def _upgrade_v4(state: dict[str, Any]) -> dict[str, Any]:
    """Format 4 to 5: every run had a fixed rollout batch (no rule, rounds by arithmetic)."""
    return {**state, "format": 5, "rollout_batch_rule": None, "round": [0, 0]}


def upgrade_checkpoint(state: dict[str, Any]) -> dict[str, Any]:
    """`state` in the current format; raises on a format this code does not know."""
    if state.get("format") == 1:
        state = _upgrade_v1(state)
    if state.get("format") == 2:
        state = _upgrade_v2(state)
    if state.get("format") == 3:
        state = _upgrade_v3(state)
    if state.get("format") == 4:
        state = _upgrade_v4(state)
    if state.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"unknown controller checkpoint format {state.get('format')!r}")
    return state
