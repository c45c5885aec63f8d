"""The grid's `scheduler` section (harness/grid.py `Scheduler`) as a Ray Tune scheduler."""

from __future__ import annotations

from harness.train import SCHEDULER_TIME


def make_scheduler(config):
    """Ray Tune's scheduler for the grid's `scheduler` section (None: FIFO, every trial whole).
    ASHA's time axis is training tokens; a trial that reaches max_tokens finishes whole."""
    if config.type == "none":
        return None
    from ray.tune.schedulers import ASHAScheduler

    return ASHAScheduler(
        time_attr=SCHEDULER_TIME,
        metric=config.metric,
        mode=config.mode,
        grace_period=config.grace_tokens,
        reduction_factor=config.reduction_factor,
        max_t=config.max_tokens,
        stop_last_trials=False,  # a trial that trains to max_tokens finishes (evaluation and record)
    )
