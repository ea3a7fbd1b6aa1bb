"""pytest plugin of memplug.testing, registered as the `pytest11` entry point `memplug`.

    pytest --pyargs memplug.testing --memplug-backend NAME [--memplug-import MODULE] ...

collects `memplug/testing/test_kit.py`, one test per (backend, rule, law) or per (rule, law) for
`--memplug-check-rule`. Without the entry point (a source checkout that is not installed), add
`-p memplug.testing.plugin`. This module imports nothing heavy until the options are used.
"""
from __future__ import annotations

import importlib


def pytest_addoption(parser):
    group = parser.getgroup("memplug", "memplug.testing: check backends and rules against docs/contract.md section 6")
    group.addoption("--memplug-backend", action="append", default=[], metavar="NAME",
                    help="check this registered backend (repeatable)")
    group.addoption("--memplug-check-rule", action="append", default=[], metavar="NAME",
                    help="check this registered rule with check_rule (repeatable)")
    group.addoption("--memplug-import", action="append", default=[], metavar="MODULE",
                    help="import MODULE first, for example the module that registers your backend (repeatable)")
    group.addoption("--memplug-rule", action="append", default=[], metavar="NAME",
                    help="only these rules (default: every rule the backend runs)")
    group.addoption("--memplug-law", action="append", default=[], metavar="NAME",
                    help="only these laws (default: all of memplug.testing.LAWS)")
    group.addoption("--memplug-dtype", action="append", default=[], metavar="DTYPE",
                    help="only these dtypes, e.g. float32 (default: every dtype the backend declares)")
    group.addoption("--memplug-max-examples", type=int, default=None, metavar="N",
                    help="hypothesis cases per law, rule and dtype (default: memplug.testing.DEFAULT_MAX_EXAMPLES)")
    group.addoption("--memplug-device", default=None, metavar="DEVICE",
                    help="device to test on (default: cuda if the backend runs there and it is present, else cpu)")


def pytest_configure(config):
    for module in config.getoption("memplug_import") or []:
        importlib.import_module(module)
