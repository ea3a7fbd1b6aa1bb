"""The test kit catches planted bugs, each with an AssertionError naming the law it breaks, and passes
a correct backend."""
import dataclasses
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import memplug
from memplug.backends.chunked import chunked_scan
from memplug.backends.reference import reference_scan, reference_step
from memplug.testing import CaseSpec, LAWS, check_backend, check_case, check_rule, make_inputs
from memplug.testing.laws import LawViolation, routed_mask

ROOT = Path(__file__).resolve().parents[1]
FAST = dict(rules=["mamba2"], dtypes=["float32"], max_examples=8)


def _register(name, scan, step=None, **kw):
    memplug.register_backend(name, scan, step, priority={"cpu": -100}, supports_rule=lambda rule: True,
                             replace=True, **kw)


@pytest.fixture
def backend_name(request):
    name = "kit_test_" + re.sub(r"\W", "_", request.node.name)
    yield name
    if name in memplug.available_backends():
        memplug.unregister_backend(name)


def _caught(name, law, match=None, **kw):
    """check_backend raises an AssertionError that names `law`; returns the message."""
    with pytest.raises(AssertionError) as info:
        check_backend(name, **dict(FAST, **kw))
    msg = str(info.value)
    assert f"[{law}]" in msg and LAWS[law].title in msg, msg
    assert f"backend {name!r}" in msg and "rule 'mamba2'" in msg, msg
    assert "Minimal failing example" in msg and "CaseSpec(" in msg, msg
    if match is not None:
        assert re.search(match, msg), msg
    return msg


# --- planted bugs ------------------------------------------------------------------------------------

def test_scaled_output_is_caught(backend_name):
    def scaled(args):
        o, S = reference_scan(args)
        return o * 1.001, S
    _register(backend_name, scaled)
    _caught(backend_name, "reference_equality", match=r"\n  o: max \|error\|")


def test_ignoring_initial_state_is_caught(backend_name):
    def forgetful(args):
        return reference_scan(args.replace(initial_state=None))
    _register(backend_name, forgetful)
    _caught(backend_name, "reference_equality")
    _caught(backend_name, "state_passing", laws=["state_passing"])


def _routed_slots(route_idx, cu_seqlens, H, m):
    """`[N,H,m]` bool: some token of sequence n routes head h to slot i."""
    mask = routed_mask(route_idx, H, m)
    if cu_seqlens is None:
        return mask.any(1)
    b = cu_seqlens.tolist()
    return torch.stack([mask[0, s:e].any(0) for s, e in zip(b[:-1], b[1:])])


def _decay_where(S, decayed):
    """Multiply the final states of the slots `decayed` [N,H,m] by exp(-0.01)."""
    factor = torch.where(decayed, torch.exp(torch.tensor(-0.01)), 1.0).to(S.dtype)
    return S * factor[..., None, None]


def test_decaying_unrouted_slots_is_caught(backend_name):
    def leaky(args):  # the bug of a dense scan that decays every slot
        o, S = reference_scan(args.replace(output_final_state=True))
        S = _decay_where(S, ~_routed_slots(args.route_idx, args.cu_seqlens, S.shape[1], args.num_slots))
        return o, (S if args.output_final_state else None)
    _register(backend_name, leaky)
    msg = _caught(backend_name, "frozen_slots", laws=["frozen_slots"])
    assert "not bit for bit equal" in msg


def test_decaying_a_slot_in_heads_that_do_not_route_to_it_is_caught(backend_name):
    def heads_share_slots(args):
        # The bug: a slot that some head routes to decays in every head, as if heads shared slots.
        o, S = reference_scan(args.replace(output_final_state=True))
        routed = _routed_slots(args.route_idx, args.cu_seqlens, S.shape[1], args.num_slots)
        S = _decay_where(S, routed.any(1, keepdim=True) & ~routed)
        return o, (S if args.output_final_state else None)
    _register(backend_name, heads_share_slots)
    # The bug shows only where the heads route differently, a case hypothesis's search does not
    # always reach within a few examples (its draws shift with the environment, e.g. once numpy is
    # imported): the law is run on such a case.
    spec = CaseSpec(rule="mamba2", dtype="float32", B=1, T=12, H=2, K=4, V=4, m=4, R=1, Hr=2, unused_slots=1,
                    unused_by_head=True, initial_state=True, seed=3)
    with pytest.raises(LawViolation, match="not bit for bit equal"):
        check_case(backend_name, "frozen_slots", spec)


def _cases_drawn(monkeypatch, law, backend="reference", **kw):
    """The cases `check_backend(backend, laws=[law], **kw)` runs `law` on (the law only records them)."""
    cases = []
    monkeypatch.setitem(LAWS, law, dataclasses.replace(LAWS[law], check=lambda ctx, spec, *extra: cases.append(spec)))
    check_backend(backend, laws=[law], **kw)
    return cases


def test_frozen_slots_cases_freeze_slots_in_some_head_groups_only(monkeypatch):
    def frozen_in_one_head_routed_in_another(spec):
        routed = _routed_slots(make_inputs(spec)["route_idx"], None, spec.H, spec.m)  # [B,H,m]
        return bool((routed.any(1) & ~routed.all(1)).any())
    cases = [s for s in _cases_drawn(monkeypatch, "frozen_slots", rules=["gla"], dtypes=["float32"], max_examples=20)
             if s.seqlens is None]
    by_head = [s for s in cases if s.unused_by_head]
    assert by_head and all(map(frozen_in_one_head_routed_in_another, by_head)), by_head


def test_relabeling_cases_have_two_slots_or_more(monkeypatch):
    cases = _cases_drawn(monkeypatch, "relabeling", rules=["mamba2"], dtypes=["float32"], max_examples=20)
    assert len(cases) == 20 and min(s.m for s in cases) == 2


def _default_scale(args):
    return args.replace(scale=args.K ** -0.5)


def test_ignoring_scale_is_caught(backend_name):
    def always_default_scale(args):
        return reference_scan(_default_scale(args))
    _register(backend_name, always_default_scale)
    _caught(backend_name, "reference_equality", match=r"scale=")


def test_step_ignoring_scale_is_caught(backend_name):
    def step(args):
        return reference_step(_default_scale(args))
    _register(backend_name, reference_scan, step)
    _caught(backend_name, "decode", laws=["decode"], match=r"scale=")


def test_other_output_without_final_state_is_caught(backend_name):
    def skips_last_token(args):  # the bug: without a final state, the last token is not read
        o, S = reference_scan(args)
        return (o if args.output_final_state else torch.cat([o[:, :-1], 0 * o[:, -1:]], 1)), S
    _register(backend_name, skips_last_token)
    _caught(backend_name, "reference_equality", match=r"o with output_final_state=False")


def test_final_state_without_output_final_state_is_caught(backend_name):
    def always_final_state(args):
        return reference_scan(args.replace(output_final_state=True))
    _register(backend_name, always_final_state)
    _caught(backend_name, "reference_equality", match=r"output_final_state=False: got Tensor, expected None")


def test_ignoring_read_w_is_caught(backend_name):
    def no_read_w(args):
        return reference_scan(args.replace(read_w=args.route_w))
    _register(backend_name, no_read_w)
    msg = _caught(backend_name, "reference_equality")
    assert "read_w=True" in msg  # the minimal case passes a read_w of its own


def test_wrong_route_w_gradient_is_caught(backend_name):
    def detached(args):
        # The bug: the routing weight enters the update detached (only the read keeps its gradient).
        return reference_scan(args.replace(route_w=args.route_w.detach()))
    _register(backend_name, detached)
    _caught(backend_name, "reference_equality", match=r"grad route_w")


class _HalfGradient(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return 0.5 * grad


def test_custom_autograd_function_with_wrong_gradient_is_caught(backend_name):
    def half_grad(args):
        return reference_scan(args.replace(route_w=_HalfGradient.apply(args.route_w)))
    _register(backend_name, half_grad)
    _caught(backend_name, "reference_equality", match=r"grad route_w")


def test_step_touching_unrouted_slots_is_caught(backend_name):
    def step(args):
        o, state = reference_step(args)
        unrouted = ~routed_mask(args.route_idx, state.shape[1], state.shape[2])[:, 0]
        return o, torch.where(unrouted[..., None, None], 0.999 * state, state)  # decays slots not routed
    _register(backend_name, reference_scan, step)
    _caught(backend_name, "decode", laws=["decode"], match="touch only the routed slots")


def test_ignoring_cu_seqlens_is_caught(backend_name):
    def one_sequence(args):
        if args.cu_seqlens is None:
            return reference_scan(args)
        init = args.initial_state
        o, S = reference_scan(args.replace(cu_seqlens=None, output_final_state=True,
                                           initial_state=None if init is None else init[:1]))
        N = args.cu_seqlens.numel() - 1
        return o, (S.expand(N, *S.shape[1:]).clone() if args.output_final_state else None)
    _register(backend_name, one_sequence)
    _caught(backend_name, "varlen", laws=["varlen"])


def test_label_dependent_backend_is_caught(backend_name):
    def favours_slot_0(args):
        o, S = reference_scan(args.replace(output_final_state=True))
        S = S.clone()
        S[:, :, 0] = S[:, :, 0] * 1.01
        return o, (S if args.output_final_state else None)
    _register(backend_name, favours_slot_0)
    _caught(backend_name, "relabeling", laws=["relabeling"])


def test_chunk_size_dependence_is_caught(backend_name):
    def chunky(args, chunk_size=None):  # delegates to the chunked backend: long cases are fast
        o, S = chunked_scan(args)
        return (o if chunk_size in (None, 32) else o * 1.01), S
    _register(backend_name, chunky, chunk_sizes=(16, 32))
    _caught(backend_name, "chunk_size", laws=["chunk_size"], match="chunk_size=16")


def test_wrong_gradient_past_two_chunks_is_caught(backend_name):
    sizes = (16, 32, 64)
    largest = max(sizes)

    def chunky(args, chunk_size=None):
        # The bug: with chunks of the largest size, the backward of the tokens past the second chunk
        # is halved; the forward is right at every chunk size.
        if chunk_size == largest:
            q = args.q
            args = args.replace(q=torch.cat([q[:, :2 * largest], _HalfGradient.apply(q[:, 2 * largest:])], 1))
        return chunked_scan(args)
    _register(backend_name, chunky, chunk_sizes=sizes)
    _caught(backend_name, "chunk_size", laws=["chunk_size"], match=rf"grad q, chunk_size={largest} vs default")


def test_a_state_lost_at_a_block_boundary_is_caught(backend_name):
    """A kernel whose second block of 64 tokens starts from zero instead of the first block's state:
    invisible in short cases, caught by the long case every law runs by default."""
    def blocks_of_64(args):
        if args.cu_seqlens is not None or args.q.shape[1] <= 64:
            return reference_scan(args)
        names = ("q", "k", "v", "route_idx", "route_w", "read_w", "g", "beta")
        part = lambda s: {n: None if getattr(args, n) is None else getattr(args, n)[:, s] for n in names}
        o1, _ = reference_scan(args.replace(**part(slice(None, 64))))
        o2, S = reference_scan(args.replace(initial_state=None, **part(slice(64, None))))
        return torch.cat([o1, o2], 1), S
    _register(backend_name, blocks_of_64)
    _caught(backend_name, "reference_equality")


def test_a_drift_that_starts_late_is_caught(backend_name):
    """Outputs 0.1 % off from token 100 on: caught by the long case, in float32 too."""
    def drifting(args):
        o, S = reference_scan(args)
        return torch.cat([o[:, :100], o[:, 100:] * 1.001], 1), S
    _register(backend_name, drifting)
    _caught(backend_name, "reference_equality")


@pytest.mark.parametrize("law", list(LAWS))
def test_every_law_runs_a_long_case_by_default(monkeypatch, law):
    # The chunk-size law needs a backend with chunk sizes; its cases are all longer than two chunks.
    backend, longest = ("chunked", 2 * 64 + 1) if law == "chunk_size" else ("reference", 2 * 64 + 2)
    lengths = [s.T for s in _cases_drawn(monkeypatch, law, backend=backend, rules=["mamba2"], dtypes=["float32"],
                                         max_examples=4)]
    assert len(lengths) == 4 and max(lengths) >= longest, lengths


def test_long_cases_straddle_declared_block_sizes(monkeypatch, backend_name):
    """A backend declaring blocks of 100 rows gets a case longer than two of them."""
    _register(backend_name, reference_scan, block_sizes=(100,))
    lengths = [s.T for s in _cases_drawn(monkeypatch, "decode", backend=backend_name, rules=["mamba2"],
                                         dtypes=["float32"], max_examples=4)]
    assert max(lengths) >= 2 * 100 + 2 and min(lengths) <= 40, lengths


def test_mask_applied_by_multiplication_is_caught(backend_name):
    def picks_tokens_by_product(args):
        # The bug: each token's output is picked out of all of them with a one-hot mask over time applied
        # by multiplication (an identity matrix) rather than selected. Exact for finite values, but
        # 0 * NaN is NaN: a later token's NaN reaches every other token.
        o, S = reference_scan(args)
        one_hot = torch.eye(o.shape[1], dtype=o.dtype, device=o.device)
        return torch.einsum("ts,bshv->bthv", one_hot, o), S
    _register(backend_name, picks_tokens_by_product)
    _caught(backend_name, "nonfinite_inputs", laws=["nonfinite_inputs"],
            match=r"\n  o of (the tokens before it|the other sequences), with [qkv] = (nan|-?inf) at token \d+")


def test_dropping_nonfinite_inputs_is_caught(backend_name):
    def zeroes_nonfinite(args):
        # The bug: NaN and inf in q, k, v are replaced by 0, so every output looks fine but is silently
        # wrong, instead of carrying the non-finite value forward as the reference does.
        finite = lambda x: torch.nan_to_num(x, nan=0.0, posinf=0.0, neginf=0.0)
        return reference_scan(args.replace(q=finite(args.q), k=finite(args.k), v=finite(args.v)))
    _register(backend_name, zeroes_nonfinite)
    _caught(backend_name, "nonfinite_inputs", laws=["nonfinite_inputs"], match="was dropped, not carried")


def test_every_law_respects_max_T(backend_name):
    def short_only(args, chunk_size=None):
        if args.q.shape[1] > 12:
            raise RuntimeError("T > 12")
        return reference_scan(args)
    _register(backend_name, short_only, chunk_sizes=(16, 32, 64))
    report = check_backend(backend_name, rules=["mamba2"], dtypes=["float32"], max_examples=3, max_T=12)
    assert {r.status for r in report.results} == {"passed"} and len(report.results) == len(LAWS)


def test_chunk_size_cases_are_longer_than_two_chunks(monkeypatch):
    cases = _cases_drawn(monkeypatch, "chunk_size", backend="chunked", rules=["mamba2"], dtypes=["float32"])
    assert len(cases) == 10 and min(s.T for s in cases) > 2 * max(memplug.get_backend("chunked").chunk_sizes)


def test_wrong_output_dtype_is_caught(backend_name):
    def float32_out(args):
        o, S = reference_scan(args)
        return o.float(), S
    _register(backend_name, float32_out)
    _caught(backend_name, "reference_equality", match="dtype", dtypes=["bfloat16"])


def test_crash_on_valid_input_is_caught(backend_name):
    def no_single_token(args):
        if args.q.shape[1] == 1:
            raise RuntimeError("kernel needs T >= 2")
        return reference_scan(args)
    _register(backend_name, no_single_token)
    msg = _caught(backend_name, "reference_equality", match="kernel needs T >= 2")
    assert "T=1" in msg


# --- correct backends pass ---------------------------------------------------------------------------

def test_correct_delegating_backend_passes(backend_name):
    def delegate(args, chunk_size=None):  # takes a chunk size that changes nothing
        return reference_scan(args)
    # Small chunk sizes keep the chunk-size law's cases short (17 to 32 tokens).
    _register(backend_name, delegate, dtypes=(torch.float32, torch.float64), chunk_sizes=(4, 8))
    report = check_backend(backend_name, rules=["mamba2", "gated_deltanet"], max_examples=4)
    statuses = {(r.rule, r.law, r.dtype): r.status for r in report.results}
    assert set(statuses.values()) == {"passed"}
    assert ("mamba2", "chunk_size", "float32") in statuses
    assert {d for (_, _, d) in statuses} == {"float32", "float64"}


def test_report_marks_laws_that_do_not_apply():
    report = check_backend("reference", rules=["fm"], dtypes=["float64"], max_examples=1,
                           laws=["chunk_size", "backbone_reduction"])
    by_law = {r.law: r.status for r in report.results}
    assert by_law["chunk_size"].startswith("not applicable")
    assert by_law["backbone_reduction"] == "passed"


def test_check_backend_rejects_bad_arguments():
    with pytest.raises(ValueError, match="backend"):
        check_backend("no_such_backend")
    with pytest.raises(ValueError, match="laws"):
        check_backend("reference", laws=["no_such_law"])
    with pytest.raises(ValueError, match="rule"):
        check_backend("reference", rules=["no_such_rule"])


@pytest.mark.parametrize("call, argument", [
    (lambda: check_backend("reference", rules="fm"), "rules"),
    (lambda: check_backend("reference", laws="decode"), "laws"),
    (lambda: check_backend("reference", dtypes="float64"), "dtypes"),
    (lambda: check_backend("reference", dtypes=torch.float64), "dtypes"),
    (lambda: check_rule("fm", backends="chunked"), "backends"),
    (lambda: check_rule("fm", dtypes="float64"), "dtypes"),
    (lambda: check_rule("fm", laws="decode"), "laws"),
])
def test_a_single_name_where_a_list_is_expected_is_an_error(call, argument):
    with pytest.raises(TypeError, match=f"^{argument}: expected a list, got the single value"):
        call()


@pytest.mark.parametrize("max_examples", [0, -1, 2.5, True])
def test_max_examples_must_be_a_positive_int(max_examples):
    for call in (lambda: check_backend("reference", max_examples=max_examples),
                 lambda: check_rule("fm", max_examples=max_examples)):
        with pytest.raises(ValueError, match="max_examples: expected an int >= 1"):
            call()


def test_check_rule_reports_a_backend_that_does_not_run_the_rule():
    def leaky(S, k, v, g, beta, w):
        return S + w[..., None, None] * (k[..., :, None] * v[..., None, :] - S) * 0.5

    memplug.register_rule("leaky_for_report", update=leaky)
    try:
        reports = check_rule("leaky_for_report", backends=("reference", "chunked"), max_examples=1,
                             laws=["decode"], dtypes=["float64"])
    finally:
        memplug.unregister_rule("leaky_for_report")
    assert [r.backend for r in reports] == ["reference", "chunked"]
    assert reports[0].results[0].status == "passed"
    status = reports[1].results[0].status
    assert status.startswith("not applicable") and "no family" in status and "only the reference" in status
    assert "chunked" in str(reports) and "not applicable" in str(reports)


def test_a_rule_that_breaks_a_law_is_named_as_the_culprit():
    def forgetful(S, k, v, g, beta, w):  # the update depends on how often it ran: decode differs from scan
        forgetful.calls += 1
        return S * (0.5 if forgetful.calls % 2 else 1.0) + w[..., None, None] * k[..., :, None] * v[..., None, :]

    forgetful.calls = 0
    memplug.register_rule("forgetful", update=forgetful)
    try:
        with pytest.raises(AssertionError) as info:
            check_rule("forgetful", max_examples=5, laws=["decode"], dtypes=["float64"])
    finally:
        memplug.unregister_rule("forgetful")
    assert "rule 'forgetful' breaks the law" in str(info.value)


def test_check_case_reproduces_a_case():
    spec = CaseSpec(rule="gla", dtype="float32", B=2, T=5, H=2, K=4, V=6, m=3, R=2, Hr=2, initial_state=True,
                    per_route=("k", "g"), read_w=True, zero_weights=True)
    inputs = make_inputs(spec)
    assert inputs["k"].shape == (2, 5, 2, 2, 4) and inputs["g"].shape == (2, 5, 2, 2, 4)
    assert inputs["route_idx"].shape == (2, 5, 2, 2)
    check_case("reference", "reference_equality", spec)
    check_case("reference", "relabeling", spec)


# --- the docs run as written -------------------------------------------------------------------------

def test_docs_examples_run_as_written(capsys):
    """Every ```python block of docs/testing.md, in order, in one namespace: a backend written from
    scratch passes check_backend, a family rule and a free-form rule pass check_rule."""
    text = (ROOT / "docs" / "testing.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    assert len(blocks) >= 3
    namespace = {}
    try:
        for block in blocks:
            exec(compile(block, str(ROOT / "docs" / "testing.md"), "exec"), namespace)
    finally:
        for backend in ("dense",):
            if backend in memplug.available_backends():
                memplug.unregister_backend(backend)
        for rule in ("retention", "hgrn2", "longhorn", "leaky_tanh"):
            if rule in memplug.available_rules():
                memplug.unregister_rule(rule)
    report = namespace["report"]
    assert {r.status for r in report.results} == {"passed", "not applicable: the backend declares no chunk sizes "
                                                  "(register_backend(chunk_sizes=...))"}
    assert "frozen_slots" in capsys.readouterr().out


# --- the pytest plugin, from the command line --------------------------------------------------------

def _pytest(tmp_path, *args):
    env = {**__import__("os").environ, "PYTHONPATH": str(tmp_path), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "--pyargs",
                           "memplug.testing", *args], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    return proc.returncode, proc.stdout + proc.stderr


def test_pytest_plugin_entry_point_is_installed(tmp_path):
    # From a neutral directory: in the repository root a stale, git-ignored memplug.egg-info can shadow
    # the installed metadata.
    code = ("from importlib.metadata import entry_points; "
            "print([e.value for e in entry_points(group='pytest11') if e.name == 'memplug'])")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True).stdout
    assert out.strip() == "['memplug.testing.plugin']", (
        "the pytest11 entry point is missing: reinstall memplug (pip install -e .) after changing pyproject.toml")


def test_pytest_plugin_runs_the_kit_on_a_user_backend(tmp_path):
    (tmp_path / "my_backends.py").write_text(textwrap.dedent('''
        import memplug
        from memplug.backends.reference import reference_scan
        from memplug.rules import Coupled

        def scaled(args):
            o, S = reference_scan(args)
            return o * 1.001, S

        memplug.register_backend("my_good", reference_scan, supports_rule=lambda rule: True)
        memplug.register_backend("my_scaled", scaled, supports_rule=lambda rule: True)
        memplug.register_rule("my_rule", family="additive_scalar",
                              couple=lambda k, v, g, beta, w: Coupled(w[..., None] * k, v, -0.1 * w, None))
    '''))
    rc, out = _pytest(tmp_path, "--memplug-import", "my_backends", "--memplug-backend", "my_good",
                      "--memplug-backend", "my_scaled", "--memplug-rule", "gla", "--memplug-dtype", "float64",
                      "--memplug-max-examples", "3", "--memplug-law", "reference_equality",
                      "--memplug-law", "state_passing", "--memplug-check-rule", "my_rule", "-rf")
    assert rc == 1, out
    # my_good: both laws pass; my_scaled: reference equality fails, state passing holds (it scales both
    # ways); my_rule: state passing (reference equality is not a rule law) passes.
    assert "1 failed, 4 passed" in out, out
    assert "FAILED" in out and "my_scaled-gla-reference_equality" in out and "[reference_equality]" in out, out


def test_pytest_plugin_without_options_skips(tmp_path):
    rc, out = _pytest(tmp_path, "-rs")
    assert rc == 0 and "2 skipped" in out and "--memplug-backend" in out, out
