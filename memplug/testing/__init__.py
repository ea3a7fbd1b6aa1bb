"""memplug.testing: a property-based test kit that checks any backend or rule against the laws of
docs/contract.md section 6 (see docs/testing.md).

    from memplug.testing import check_backend, check_rule
    check_backend("my_backend")          # every law, every rule it runs, every dtype it declares
    check_rule("my_rule")                # the laws any rule obeys, on the reference backend

From the command line (the pytest plugin `memplug.testing.plugin` is registered as an entry point):

    pytest --pyargs memplug.testing --memplug-backend my_backend --memplug-import my_package.backend

A broken law raises AssertionError naming the law, the rule and a minimal failing `CaseSpec`
(shrunk by hypothesis), which `check_case` runs again and `make_inputs` turns into tensors.

Contents: `check_backend`, `check_rule`, `check_case`; `LAWS` (name -> law), `RULE_LAWS`;
`TOLERANCES` (dtype -> tolerances), `Tol`; strategies `case_specs`, `scan_inputs`, with `CaseSpec` and
`make_inputs`, and `poisons`, with `Poison` (the non-finite-inputs law); `kit_settings` (the
deterministic hypothesis settings); `LawViolation`.
"""
from .kit import DEFAULT_MAX_EXAMPLES, LawResult, Report, check_backend, check_case, check_rule, kit_settings, run_law
from .laws import LAWS, RULE_LAWS, LawViolation, backbone_reference, backend_chunk_sizes
from .strategies import CaseSpec, Poison, case_specs, make_inputs, poisons, scan_inputs
from .tolerances import TOLERANCES, Tol

__all__ = [
    "check_backend", "check_rule", "check_case", "run_law", "Report", "LawResult", "kit_settings",
    "DEFAULT_MAX_EXAMPLES", "LAWS", "RULE_LAWS", "LawViolation", "backbone_reference", "backend_chunk_sizes",
    "CaseSpec", "case_specs", "make_inputs", "scan_inputs", "Poison", "poisons", "TOLERANCES", "Tol",
]
