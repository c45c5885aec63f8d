"""The trial id: `<setting>-<10 hex digits>`, a digest of what a trial measures, so the same
experiment gets the same id (and the same record folder, and reuses its dense baseline) on
any machine. Which fields count is declared on each field (`identity`, factorllm_core/options.py):

    always             part of what is measured (the default)
    never              where it runs or what is kept and reported (device, keep_checkpoints,
                       train.report_every, ...)
    unless default     added after records existed: left out at its default, so ids from
                       before it stay valid (options declared with added_later=True too)
    where experts run  as `unless default`, and left out of a dense trial's id (the dispatch
                       of experts a dense model does not have)

Ids are pinned (tests/harness/test_pinned_ids.py): changing a rule here orphans every record.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json

from factorllm_core.options import NEVER, UNLESS_DEFAULT, WHERE_EXPERTS_RUN, identity_of


def trial_id(config) -> str:
    """The id of a TrialConfig (harness/config/trial_config.py)."""
    data = config.to_dict()
    _drop(config, data, dense=config.factor is None)
    digest = hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:10]
    kind = "dense" if config.factor is None else config.factor.name
    return f"{kind}-{digest}"


def _drop(instance, data: dict, dense: bool) -> None:
    """Remove from `data` (instance's to_dict) each field its identity rule leaves out, in every
    section (a section that is None, the dense model's factor, has nothing to remove)."""
    for f in dataclasses.fields(instance):
        value = getattr(instance, f.name)
        if dataclasses.is_dataclass(value):
            _drop(value, data[f.name], dense)
            continue
        rule = identity_of(f)
        at_default = f.default is not dataclasses.MISSING and data[f.name] == f.default
        if (
            rule == NEVER
            or (rule in (UNLESS_DEFAULT, WHERE_EXPERTS_RUN) and at_default)
            or (rule == WHERE_EXPERTS_RUN and dense)
        ):
            data.pop(f.name)
