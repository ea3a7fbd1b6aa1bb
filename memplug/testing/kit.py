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
from memplug.registry import Backend, get_backend
from memplug.rules import available_rules, get_rule

from .laws import (DEFAULT_BLOCK_SIZES, LAWS, RULE_LAWS, Context, LawViolation, backend_block_sizes,
                   backend_chunk_sizes)
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
    backend = get_backend(name)
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
        check_scan(**dict(inputs, rule=get_rule(spec.rule), output_final_state=False))
    except ValueError:
        return False
    return True


def _explain(ctx: Context, law, rule: str, args, error) -> str:
    spec, extra = args[0], args[1:]
    extra_txt = "".join(f", {x!r}" for x in extra)
    who = ctx.subject or f"backend {ctx.backend!r}"
    return (f"memplug.testing: {who} breaks the law '{law.title}' [{law.name}] "
            f"on rule {rule!r}, backend {ctx.backend!r}, dtype {spec.dtype}, device {ctx.device}:\n  {error}\n"
            f"Minimal failing example (shrunk by hypothesis):\n  {spec!r}{extra_txt}\n"
            f"Reproduce: memplug.testing.check_case({ctx.backend!r}, {law.name!r}, {spec!r}{extra_txt})")


LONG_T_RANGE = 16  # long cases draw T from 2 b + 2 to 2 b + 17, b the largest block size


def long_limits(block_sizes: Sequence[int], limits: dict) -> Optional[dict]:
    """Limits that draw a long case: longer than two blocks of the largest block size, one or two
    slots (so that a slot's packed tokens cross the block boundaries), one batch row. None if the
    caller's `max_T` is shorter."""
    longest = 2 * max(block_sizes) + 2
    if limits.get("max_T", longest + LONG_T_RANGE - 1) < longest:
        return None
    return dict(limits, min_T=longest, max_T=longest + LONG_T_RANGE - 1, max_m=2, max_B=1)


def run_law(ctx: Context, law_name: str, rule: str, dtypes: Sequence, max_examples: int, **limits) -> int:
    """Run one law on `max_examples` drawn cases; returns the number of cases run, raises
    AssertionError naming the law, the rule and the minimal failing case. `limits`: keywords of
    `case_specs` that bound the cases (min_T, max_T, max_B, max_H, max_m, dims); without max_T, each
    law's default (see `check_backend`)."""
    __tracebackhide__ = True
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
    dtypes = _names("dtypes", dtypes)
    if dtypes is None:  # every declared dtype, the most precise first (its failures are the clearest)
        return [n for n in DTYPES if DTYPES[n] in backend.dtypes]
    names = [dtype_name(d) for d in dtypes]
    declared = [dtype_name(d) for d in backend.dtypes if d in DTYPES.values()]
    for n in names:
        if n not in declared:
            raise ValueError(f"dtypes: backend {backend.name!r} declares dtypes {declared}, not {n}")
    return names


def _run_laws(ctx, report, rule, laws, dtypes, max_examples, limits, verbose, block_sizes=DEFAULT_BLOCK_SIZES):
    """Each law on each dtype. Of the first (most precise) dtype's cases, one is long (`long_limits`),
    so that every law sees a state carried across the blocks a kernel may split a sequence into."""
    __tracebackhide__ = True
    long = long_limits(block_sizes, limits)
    for name in laws:
        law = LAWS[name]
        why_not = law.applies(ctx, rule)
        if why_not is not None:
            report.results.append(LawResult(rule, name, None, f"not applicable: {why_not}"))
            continue
        for i, dtype in enumerate(dtypes):
            start = time.perf_counter()
            n = 0
            if i == 0 and long is not None:
                n = run_law(ctx, name, rule, [dtype], 1, **long)
            if max_examples - n > 0:
                n += run_law(ctx, name, rule, [dtype], max_examples - n, **limits)
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


def _names(argument: str, value) -> Optional[list]:
    """A list from an iterable of names; a single string is an error (iterating it would give its
    characters)."""
    if value is None:
        return None
    if isinstance(value, (str, torch.dtype)):
        raise TypeError(f"{argument}: expected a list, got the single value {value!r}; pass [{value!r}]")
    return list(value)


def _max_examples(max_examples) -> int:
    if max_examples is None:
        return DEFAULT_MAX_EXAMPLES
    if not isinstance(max_examples, int) or isinstance(max_examples, bool) or max_examples < 1:
        raise ValueError(f"max_examples: expected an int >= 1 (cases per law, rule and dtype), got {max_examples!r}")
    return max_examples


def _law_names(laws, allowed: Sequence[str], caller: str) -> list:
    """`laws` (default: all of `allowed`, in order), each checked to be one of `allowed`."""
    laws = _names("laws", laws)
    if laws is None:
        return list(allowed)
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
    with c the largest chunk size offered; see docs/testing.md). Unless max_T is shorter, one case
    of each law (in the first dtype) is long: 2 b + 2 to 2 b + 17 tokens, b the largest block size
    (64, and the chunk and block sizes the backend declared), so that a state
    lost or a drift starting at a block boundary shows. dims: the values K and V are drawn from
    (default 8, 4, 16, 6, 12; a kernel that compiles per shape may want fewer).

    Returns a `Report`; raises AssertionError naming the law, the rule and a minimal failing case.
    """
    __tracebackhide__ = True  # under pytest, a failure shows the law's message, not the kit's source
    backend = _backend(name)
    ctx = Context(name, _device(backend, device), merge_tolerances(tolerances), backend_chunk_sizes(backend))
    rules = _names("rules", rules)
    if rules is None:
        rules = [r for r in available_rules() if backend.supports_rule(get_rule(r))]
    else:
        rules = [get_rule(r).name for r in rules]
        for r in rules:
            if not backend.supports_rule(get_rule(r)):
                raise ValueError(f"rules: backend {name!r} does not run rule {r!r}")
    laws = _law_names(laws, list(LAWS), "check_backend")
    dtypes = _dtypes(backend, dtypes)
    n = _max_examples(max_examples)
    report = Report(name)
    for rule in rules:
        _run_laws(ctx, report, rule, laws, dtypes, n, _limits(max_T, dims), verbose, backend_block_sizes(backend))
    return report


class Reports(list):
    """The `Report`s of `check_rule`, one per backend; `str()` prints them as one table each."""

    def __str__(self):
        return "\n".join(map(str, self))


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
    of them on the reference backend, all of `LAWS` on the others). A backend that does not run the
    rule gets a report saying so ("not applicable", with the reason). Returns one `Report` per
    backend, in a list that prints as tables (`Reports`).
    """
    __tracebackhide__ = True
    rule = get_rule(name).name
    backends = _names("backends", backends)
    dtypes = _names("dtypes", dtypes)
    rule_laws = _law_names(laws, RULE_LAWS, "check_rule (the laws of any rule, RULE_LAWS)")
    n = _max_examples(max_examples)
    for b in backends:
        _backend(b)
    reports = Reports()
    if "reference" in backends:
        ref = _backend("reference")
        # On the reference backend, which reads a rule literally, a broken law is the rule's.
        ctx = Context("reference", _device(ref, None), merge_tolerances(None), None, subject=f"rule {rule!r}")
        report = Report("reference")
        _run_laws(ctx, report, rule, rule_laws, [dtype_name(d) for d in dtypes], n, _limits(max_T, None), verbose)
        reports.append(report)
    for b in backends:
        if b == "reference":
            continue
        backend = _backend(b)
        if not backend.supports_rule(get_rule(rule)):
            report = Report(b)
            why = backend.rule_refusal(get_rule(rule))
            report.results.append(LawResult(rule, "(every law)", None, f"not applicable: {why}"))
            reports.append(report)
            continue
        declared = [dtype_name(d) for d in backend.dtypes if d in DTYPES.values()]
        reports.append(check_backend(b, rules=[rule], dtypes=[d for d in map(dtype_name, dtypes) if d in declared]
                                     or None, max_examples=max_examples, laws=laws, max_T=max_T, verbose=verbose))
    return reports


__all__ = ["check_backend", "check_rule", "check_case", "run_law", "Report", "Reports", "LawResult", "kit_settings"]
