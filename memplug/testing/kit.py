"""`check_backend` and `check_rule`: every law of docs/contract.md section 6 on hypothesis-drawn cases."""
from __future__ import annotations

import time
import zlib
from dataclasses import dataclass, field
from typing import Iterable, Optional, Sequence

import torch
from hypothesis import HealthCheck, Verbosity, given, reject, seed, settings
from hypothesis.errors import HypothesisException

from memplug.checks import check_scan
from memplug.registry import _BACKENDS, Backend
from memplug.rules import available_rules, get_rule

from .laws import LAWS, RULE_LAWS, Context, LawViolation, backend_chunk_sizes
from .strategies import DTYPES, CaseSpec, dtype_name, make_inputs
from .tolerances import merge_tolerances

DEFAULT_MAX_EXAMPLES = 10  # per law, rule and dtype


@dataclass
class LawResult:
    rule: str
    law: str
    dtype: Optional[str]
    status: str  # "passed", "failed" or "not applicable: <why>"
    seconds: float = 0.0
    examples: int = 0


@dataclass
class Report:
    """What `check_backend` / `check_rule` ran. `str(report)` is a table."""

    backend: str
    results: list = field(default_factory=list)

    @property
    def seconds(self) -> float:
        return sum(r.seconds for r in self.results)

    def __str__(self):
        lines = [f"memplug.testing report for backend {self.backend!r} ({self.seconds:.1f} s)"]
        for r in self.results:
            lines.append(f"  {r.rule:16s} {r.law:20s} {r.dtype or '-':9s} {r.examples:3d} cases "
                         f"{r.seconds:6.2f} s  {r.status}")
        return "\n".join(lines)


def kit_settings(max_examples: int, derandomize: bool = True) -> settings:
    """Deterministic hypothesis settings: derandomized (the kit itself uses a fixed seed per law, rule
    and dtype instead), no deadline, no example database, quiet."""
    return settings(max_examples=max_examples, derandomize=derandomize, deadline=None, database=None,
                    suppress_health_check=list(HealthCheck), print_blob=False, report_multiple_bugs=False,
                    verbosity=Verbosity.quiet)


def _backend(name) -> Backend:
    if name not in _BACKENDS:
        raise ValueError(f"backend: unknown backend {name!r}; registered: {sorted(_BACKENDS)}")
    backend = _BACKENDS[name]
    if not backend.available():
        raise ValueError(f"backend: backend {name!r} is not available on this machine")
    return backend


def _device(backend: Backend, device) -> torch.device:
    if device is not None:
        device = torch.device(device)
        if device.type not in backend.priority:
            raise ValueError(f"device: backend {backend.name!r} runs on {sorted(backend.priority)}, not {device.type}")
        return device
    if "cuda" in backend.priority and torch.cuda.is_available():
        return torch.device("cuda")
    if "cpu" in backend.priority:
        return torch.device("cpu")
    raise ValueError(f"device: backend {backend.name!r} runs on {sorted(backend.priority)}; pass device=")


def _valid(spec: CaseSpec, device) -> bool:
    """Whether the rule's own `check` accepts the drawn weights (a user rule may reject some)."""
    if get_rule(spec.rule).check is None:
        return True
    inputs = make_inputs(spec, device)
    try:
        check_scan(**dict(inputs, rule=get_rule(spec.rule)))
    except ValueError:
        return False
    return True


def _explain(ctx: Context, law, rule: str, args, error) -> str:
    spec, extra = args[0], args[1:]
    extra_txt = "".join(f", {x!r}" for x in extra)
    return (f"memplug.testing: backend {ctx.backend!r} breaks the law '{law.title}' [{law.name}] "
            f"on rule {rule!r}, dtype {spec.dtype}, device {ctx.device}:\n  {error}\n"
            f"Minimal failing example (shrunk by hypothesis):\n  {spec!r}{extra_txt}\n"
            f"Reproduce: memplug.testing.check_case({ctx.backend!r}, {law.name!r}, {spec!r}{extra_txt})")


def run_law(ctx: Context, law_name: str, rule: str, dtypes: Sequence, max_examples: int, **limits) -> int:
    """Run one law on `max_examples` drawn cases; returns the number of cases run, raises
    AssertionError naming the law, the rule and the minimal failing case. `limits`: keywords of
    `case_specs` that bound the cases (max_T, max_B, max_H, max_m, dims); without max_T, each law's
    default (see `check_backend`)."""
    law = LAWS[law_name]
    failing = {}
    count = [0]

    # A fixed seed per (law, rule, dtypes): deterministic, and each rule and dtype sees other cases.
    @seed(zlib.crc32(f"{law_name}/{rule}/{','.join(map(dtype_name, dtypes))}".encode()))
    @kit_settings(max_examples, derandomize=False)
    @given(law.strategy(ctx, rule, [dtype_name(d) for d in dtypes], **limits))
    def _law(args):
        if not _valid(args[0], ctx.device):
            reject()
        count[0] += 1
        try:
            law.check(ctx, *args)
        except LawViolation as e:
            failing["args"], failing["error"] = args, e
            raise
        except HypothesisException:
            raise
        except Exception as e:  # anything else raised on valid input breaks the law too
            failing["args"], failing["error"] = args, f"{type(e).__name__}: {e}"
            raise LawViolation(f"{type(e).__name__}: {e}") from e

    try:
        _law()
    except AssertionError:
        if "args" not in failing:
            raise
        raise AssertionError(_explain(ctx, law, rule, failing["args"], failing["error"])) from None
    except Exception as e:  # e.g. hypothesis' Flaky: the failure did not reproduce
        if "args" not in failing:
            raise
        raise AssertionError(_explain(ctx, law, rule, failing["args"],
                                      f"{failing['error']} (and then: {type(e).__name__}: {e})")) from None
    return count[0]


def check_case(backend: str, law: str, spec: CaseSpec, *extra, device=None, tolerances=None) -> None:
    """Run one law on one case (for example the minimal failing case of a report), no hypothesis."""
    b = _backend(backend)
    ctx = Context(backend, _device(b, device), merge_tolerances(tolerances), backend_chunk_sizes(b))
    LAWS[law].check(ctx, spec, *extra)


def _dtypes(backend: Backend, dtypes) -> list:
    if dtypes is None:  # every declared dtype, the most precise first (its failures are the clearest)
        return [n for n in DTYPES if DTYPES[n] in backend.dtypes]
    names = [dtype_name(d) for d in dtypes]
    declared = [dtype_name(d) for d in backend.dtypes if d in DTYPES.values()]
    for n in names:
        if n not in declared:
            raise ValueError(f"dtypes: backend {backend.name!r} declares dtypes {declared}, not {n}")
    return names


def _run_laws(ctx, report, rule, laws, dtypes, max_examples, limits, verbose):
    for name in laws:
        law = LAWS[name]
        why_not = law.applies(ctx, rule)
        if why_not is not None:
            report.results.append(LawResult(rule, name, None, f"not applicable: {why_not}"))
            continue
        for dtype in dtypes:
            start = time.perf_counter()
            n = run_law(ctx, name, rule, [dtype], max_examples, **limits)
            report.results.append(LawResult(rule, name, dtype, "passed", time.perf_counter() - start, n))
            if verbose:
                print(report.results[-1])


def _limits(max_T, dims) -> dict:
    limits = {}
    if max_T is not None:
        limits["max_T"] = max_T
    if dims is not None:
        limits["dims"] = tuple(dims)
    return limits


def _law_names(laws, allowed: Sequence[str], caller: str) -> list:
    """`laws` (default: all of `allowed`, in order), each checked to be one of `allowed`."""
    if laws is None:
        return list(allowed)
    laws = list(laws)
    unknown = [law for law in laws if law not in LAWS]
    if unknown:
        raise ValueError(f"laws: unknown law(s) {unknown}; known: {list(LAWS)}")
    outside = [law for law in laws if law not in allowed]
    if outside:
        raise ValueError(f"laws: {caller} does not run {outside}; it runs {list(allowed)}")
    return laws


def check_backend(name: str, rules: Optional[Iterable[str]] = None, dtypes: Optional[Iterable] = None,
                  max_examples: Optional[int] = None, *, laws: Optional[Iterable[str]] = None, device=None,
                  tolerances: Optional[dict] = None, max_T: Optional[int] = None, dims: Optional[Sequence[int]] = None,
                  verbose: bool = False) -> Report:
    """Check that backend `name` obeys every law of docs/contract.md section 6 (see docs/testing.md).

    rules: the rules to check (default: every registered rule the backend supports). dtypes: the
    input dtypes (default: every dtype the backend declares). max_examples: hypothesis cases per law,
    rule and dtype (default 10). laws: a subset of `memplug.testing.LAWS` (default: all, in order).
    device: default cuda if the backend runs there and it is present, else cpu. tolerances:
    overrides of `memplug.testing.TOLERANCES`, `{dtype: {"output"|"state"|"grad": Tol}}`.
    max_T: the longest sequence drawn by every law (default: 40, and for the chunk-size law 2 c + 16
    with c the largest chunk size offered; see docs/testing.md). dims: the values K and V are drawn
    from (default 8, 4, 16, 6, 12; a kernel that compiles per shape may want fewer).

    Returns a `Report`; raises AssertionError naming the law, the rule and a minimal failing case.
    """
    backend = _backend(name)
    ctx = Context(name, _device(backend, device), merge_tolerances(tolerances), backend_chunk_sizes(backend))
    if rules is None:
        rules = [r for r in available_rules() if backend.supports_rule(get_rule(r))]
    else:
        rules = [get_rule(r).name for r in rules]
        for r in rules:
            if not backend.supports_rule(get_rule(r)):
                raise ValueError(f"rules: backend {name!r} does not run rule {r!r}")
    laws = _law_names(laws, list(LAWS), "check_backend")
    dtypes = _dtypes(backend, dtypes)
    n = DEFAULT_MAX_EXAMPLES if max_examples is None else max_examples
    report = Report(name)
    for rule in rules:
        _run_laws(ctx, report, rule, laws, dtypes, n, _limits(max_T, dims), verbose)
    return report


def check_rule(name: str, *, backends: Sequence[str] = ("reference",), dtypes: Iterable = ("float64", "float32"),
               max_examples: Optional[int] = None, laws: Optional[Iterable[str]] = None,
               max_T: Optional[int] = None, verbose: bool = False) -> list:
    """Check a registered rule against the laws that hold for any rule given its single-token update:
    state passing, decode, varlen, frozen slots, relabeling, and "a route of weight 0 is no route"
    (`memplug.testing.RULE_LAWS`), on the reference backend in `dtypes`.

    Every other backend named in `backends` that runs the rule (a fast backend runs family rules) then
    gets the full `check_backend(backend, rules=[name])`, which adds reference equality, chunk size
    and backbone reduction (for a user rule: against its own update run densely, see
    `backbone_reference`). `laws`: a subset of `RULE_LAWS`, for every backend checked (default: all
    of them on the reference backend, all of `LAWS` on the others). Returns one `Report` per backend.
    """
    rule = get_rule(name).name
    rule_laws = _law_names(laws, RULE_LAWS, "check_rule (the laws of any rule, RULE_LAWS)")
    reports = []
    if "reference" in backends:
        ref = _backend("reference")
        ctx = Context("reference", _device(ref, None), merge_tolerances(None), None)
        report = Report("reference")
        _run_laws(ctx, report, rule, rule_laws, [dtype_name(d) for d in dtypes],
                  DEFAULT_MAX_EXAMPLES if max_examples is None else max_examples, _limits(max_T, None), verbose)
        reports.append(report)
    for b in backends:
        if b == "reference":
            continue
        backend = _backend(b)
        if not backend.supports_rule(get_rule(rule)):
            continue
        declared = [dtype_name(d) for d in backend.dtypes if d in DTYPES.values()]
        reports.append(check_backend(b, rules=[rule], dtypes=[d for d in map(dtype_name, dtypes) if d in declared]
                                     or None, max_examples=max_examples, laws=laws, max_T=max_T, verbose=verbose))
    return reports


__all__ = ["check_backend", "check_rule", "check_case", "run_law", "Report", "LawResult", "kit_settings"]
