"""Ray Tune's side of a sweep, one module per Tune interface the sweep implements:

    worker.py       the trainable: one trial inside a Ray worker, its results and checkpoints
    callbacks.py    Tune callbacks: progress lines, records of stopped trials, result loggers,
                    Tune's failure tracebacks moved to the trial's log
    schedulers.py   the grid's `scheduler` section as a Tune scheduler
    cluster.py      what each trial reserves, checked against the live cluster

`harness/sweep.py` is the driver that wires them into a `tune.Tuner`. Ray is imported lazily
by the worker and the driver, so `--dry-run` and the report never start it.
"""
