"""docs/contract.md section 7: every class of bad input raises ValueError or TypeError naming the argument, before
any work, in `routed_scan` and in `routed_step`. The inputs go to a spy backend that fails the test if it
is ever called."""
import pytest
import torch

import memplug
from memplug import routed_scan, routed_step

B, T, H, K, V, M, R = 1, 3, 2, 4, 5, 3, 2
SPY = "bad_input_spy"


def _never(*args, **kwargs):
    raise AssertionError("the backend was called although the input is invalid")


@pytest.fixture(autouse=True, scope="module")
def spy_backend():
    memplug.register_backend(SPY, _never, _never, priority={"cpu": -100}, supports_rule=lambda rule: True,
                             replace=True)
    memplug.register_backend(SPY + "_f32", _never, _never, priority={"cpu": -100}, dtypes=(torch.float32,),
                             supports_rule=lambda rule: True, replace=True)
    yield
    memplug.unregister_backend(SPY)
    memplug.unregister_backend(SPY + "_f32")


def valid(entry, dtype=torch.float32):
    """Valid gated_deltanet inputs of `routed_scan` (entry "scan") or `routed_step` (entry "step")."""
    gen = torch.Generator().manual_seed(0)
    t = 1 if entry == "step" else T
    rand = lambda *s: torch.rand(*s, generator=gen, dtype=torch.float64).to(dtype)
    kw = dict(q=rand(B, t, H, K), k=torch.nn.functional.normalize(rand(B, t, H, K), dim=-1), v=rand(B, t, H, V),
              rule="gated_deltanet", route_idx=torch.tensor([[0, 2], [1, 0], [2, 1]])[:t].reshape(B, t, 1, R),
              route_w=rand(B, t, 1, R), g=-rand(B, t, H), beta=rand(B, t, H), read_w=rand(B, t, 1, R),
              backend=SPY)
    state = torch.zeros(B, H, M, K, V, dtype=torch.float64 if dtype == torch.float64 else torch.float32)
    if entry == "step":
        kw["state"] = state
    else:
        kw.update(num_slots=M, initial_state=state, output_final_state=True)
    return kw


def call(entry, **changes):
    kw = valid(entry)
    kw.update(changes)
    return (routed_step if entry == "step" else routed_scan)(**kw)


def expect(error, names, entry, **changes):
    """The call raises `error`, and its message names each of `names` (the argument, what it got)."""
    with pytest.raises(error) as info:
        call(entry, **changes)
    for name in names:
        assert name in str(info.value), f"{name!r} not in {str(info.value)!r}"


ENTRIES = pytest.mark.parametrize("entry", ["scan", "step"])


def state_name(entry):
    return "state" if entry == "step" else "initial_state"


@ENTRIES
def test_valid_inputs_reach_the_backend(entry):
    with pytest.raises(AssertionError, match="backend was called"):
        call(entry)


@ENTRIES
@pytest.mark.parametrize("arg, make", [
    ("k", lambda kw: kw["k"][..., :-1]),                                   # K differs from q
    ("k", lambda kw: kw["k"].unsqueeze(3).expand(*kw["k"].shape[:3], R + 1, K)),  # per route, R + 1 routes
    ("v", lambda kw: kw["v"][:, :, :1]),                                   # H differs
    ("g", lambda kw: kw["g"][..., None].expand(*kw["g"].shape, K)),        # vector g for a scalar-g rule
    ("beta", lambda kw: kw["beta"][:, :, :1]),
    ("route_w", lambda kw: kw["route_w"][..., :1]),                        # not the shape of route_idx
    ("read_w", lambda kw: kw["read_w"].expand(B, kw["q"].shape[1], H, R).clone()),
    ("route_idx", lambda kw: kw["route_idx"].expand(B, kw["q"].shape[1], 3, R).clone()),  # Hr not in {1, H}
])
def test_mismatched_shapes(entry, arg, make):
    kw = valid(entry)
    bad = make(kw)
    expect(ValueError, [arg, "[" + ", ".join(map(str, bad.shape)) + "]"], entry, **{arg: bad})


@ENTRIES
def test_mismatched_state_shape(entry):
    name = state_name(entry)
    bad = torch.zeros(B, H, M, K, V + 1)
    expect(ValueError, [name, str(list(bad.shape))], entry, **{name: bad})


def test_step_takes_one_token():
    q = torch.rand(B, 2, H, K)
    expect(ValueError, ["q", "one token"], "step", q=q)


@ENTRIES
def test_q_not_a_tensor(entry):
    expect(TypeError, ["q", "list"], entry, q=[[1.0]])


@ENTRIES
@pytest.mark.parametrize("dim", ["B", "H"])
def test_empty_batch_or_heads(entry, dim):
    kw = valid(entry)
    per_token = ("q", "k", "v", "g", "beta") + (("route_idx", "route_w", "read_w") if dim == "B" else ())
    changes = {n: kw[n][:0] if dim == "B" else kw[n][:, :, :0] for n in per_token}
    name = state_name(entry)
    changes[name] = kw[name][:0] if dim == "B" else kw[name][:, :0]
    expect(ValueError, ["q", f"{dim} >= 1", f"{dim} = 0"], entry, **changes)


@ENTRIES
def test_unknown_rule(entry):
    expect(ValueError, ["rule", "no_such_rule"], entry, rule="no_such_rule")


@ENTRIES
def test_unknown_backend(entry):
    expect(ValueError, ["backend", "no_such_backend"], entry, backend="no_such_backend")


@ENTRIES
@pytest.mark.parametrize("bad_slot", [M, -1])
def test_route_idx_out_of_range(entry, bad_slot):
    idx = valid(entry)["route_idx"].clone()
    idx[0, 0, 0, 1] = bad_slot
    # routed_step's slot count is its state's: the error names where the count came from
    slots = "state.shape[2]" if entry == "step" else "num_slots"
    expect(ValueError, ["route_idx", str(bad_slot), f"[0, {slots}) = [0, {M})"], entry, route_idx=idx)


@ENTRIES
def test_route_idx_repeated_within_a_token(entry):
    idx = valid(entry)["route_idx"].clone()
    idx[0, 0, 0, 1] = idx[0, 0, 0, 0]
    expect(ValueError, ["route_idx", "distinct"], entry, route_idx=idx)


@ENTRIES
def test_route_idx_not_int64(entry):
    expect(TypeError, ["route_idx", "int32"], entry, route_idx=valid(entry)["route_idx"].int())


@ENTRIES
@pytest.mark.parametrize("arg", ["route_w", "read_w"])
def test_negative_weights(entry, arg):
    w = valid(entry)[arg].clone()
    w[0, 0, 0, 0] = -0.5
    expect(ValueError, [arg, "-0.5", ">= 0"], entry, **{arg: w})


@ENTRIES
def test_positive_log_decay(entry):
    g = valid(entry)["g"].clone()
    g[0, 0, 1] = 0.25
    expect(ValueError, ["g", "0.25", "<= 0"], entry, g=g)


@ENTRIES
@pytest.mark.parametrize("bad", [-0.1, 1.5])
def test_beta_outside_unit_interval(entry, bad):
    beta = valid(entry)["beta"].clone()
    beta[0, 0, 0] = bad
    expect(ValueError, ["beta", str(bad), "[0, 1]"], entry, beta=beta)


@ENTRIES
def test_missing_or_unexpected_rule_inputs(entry):
    expect(ValueError, ["g", "needs"], entry, g=None)
    expect(ValueError, ["beta", "takes no"], entry, rule="mamba2")


@pytest.mark.parametrize("cu", [[0, 2, 2, 3], [0, 2, 1, 3], [0, 2], [0, 1, 4], [1, 3]])
def test_cu_seqlens_not_increasing_or_not_ending_at_T(cu):
    # routed_step has no cu_seqlens: one token per row, rows are sequences.
    cu = torch.tensor(cu)
    init = torch.zeros(len(cu) - 1, H, M, K, V)
    expect(ValueError, ["cu_seqlens", str(cu.tolist())], "scan", cu_seqlens=cu, initial_state=init)


def test_cu_seqlens_needs_one_row():
    kw = valid("scan")
    two_rows = {n: kw[n].expand(2, *kw[n].shape[1:]) for n in ("q", "k", "v", "g", "beta", "route_idx", "route_w",
                                                               "read_w")}
    expect(ValueError, ["cu_seqlens", "B = 1"], "scan", cu_seqlens=torch.tensor([0, 3]), initial_state=None,
           **two_rows)


@ENTRIES
def test_dtype_the_backend_cannot_take(entry):
    kw = valid(entry, dtype=torch.float64)
    kw["backend"] = SPY + "_f32"
    with pytest.raises(ValueError) as info:
        (routed_step if entry == "step" else routed_scan)(**kw)
    assert "backend" in str(info.value) and "float64" in str(info.value)


@ENTRIES
@pytest.mark.parametrize("arg", ["g", "beta", "route_w", "read_w", "state"])
def test_float64_side_input_with_float32_q(entry, arg):
    if arg == "state":
        arg = state_name(entry)
    x = valid(entry)[arg].to(torch.float64)
    with pytest.raises((ValueError, TypeError)) as info:
        call(entry, **{arg: x})
    assert arg in str(info.value) and "float64" in str(info.value)


@ENTRIES
def test_k_v_dtype_must_match_q(entry):
    expect(TypeError, ["k", "float64"], entry, k=valid(entry)["k"].double())
    expect(TypeError, ["v", "float16"], entry, v=valid(entry)["v"].half())


@ENTRIES
def test_non_finite_inputs(entry):
    w = valid(entry)["route_w"].clone()
    w[0, 0, 0, 0] = float("nan")
    expect(ValueError, ["route_w", "NaN"], entry, route_w=w)


def test_step_state_dtype():
    expect(TypeError, ["state", "float16"], "step", state=torch.zeros(B, H, M, K, V, dtype=torch.float16))


def test_scan_arguments_of_the_wrong_kind():
    expect(ValueError, ["num_slots"], "scan", num_slots=0)
    expect(ValueError, ["coupling", "'sum'"], "scan", coupling="sum")
    expect(TypeError, ["output_final_state"], "scan", output_final_state="yes")
    expect(TypeError, ["rule", "list"], "scan", rule=["gla"])


@pytest.mark.parametrize("kwargs, argument", [
    (dict(dtypes=torch.float32), "dtypes"),
    (dict(dtypes=["float32"]), "dtypes"),
    (dict(dtypes=()), "dtypes"),
    (dict(priority=["cpu"]), "priority"),
    (dict(priority={"cpu": "high"}), "priority"),
    (dict(priority={"cpu": 1.5}), "priority"),
    (dict(priority={}), "priority"),
    (dict(available=True), "available"),
    (dict(supports_rule=True), "supports_rule"),
    (dict(families="delta"), "families"),
    (dict(families=["delta"]), "families"),
    (dict(supports=True), "supports"),
    (dict(supports_step="K <= 64"), "supports_step"),
    (dict(chunk_sizes=16), "chunk_sizes"),
    (dict(chunk_sizes=(0, 16)), "chunk_sizes"),
    (dict(block_sizes=(1.5,)), "block_sizes"),
])
def test_register_backend_rejects_bad_arguments(kwargs, argument):
    with pytest.raises(TypeError) as info:
        memplug.register_backend("bad_backend", _never, **kwargs)
    assert f"register_backend: {argument} must be" in str(info.value)
    assert "bad_backend" not in memplug.available_backends()


def test_declared_chunk_sizes_need_a_chunk_size_keyword():
    def scan(args):
        raise AssertionError("never called")
    with pytest.raises(TypeError, match="chunk_sizes given, but scan takes no keyword chunk_size"):
        memplug.register_backend("bad_backend", scan, chunk_sizes=(16,))
    assert "bad_backend" not in memplug.available_backends()


def test_unknown_backend_names_the_registered_ones():
    with pytest.raises(ValueError, match=r"^backend: unknown backend 'nope'; registered: \[.*'chunked'"):
        memplug.get_backend("nope")
    assert memplug.get_backend("chunked").name == "chunked"
