"""One module per stock MoE class an export can write; each registers itself in
harness/export/target.py's TARGETS when imported. A new target class is one file here."""

import importlib
import pkgutil

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")
