"""The performance model of the Triton kernels (`memplug.backends.triton.cost_model`) against the
code: every launch of a forward and backward pass, the tensors it is given, and the products it
executes in Triton's interpreter; and `memplug bench --model`, which prints it beside fla's."""
import subprocess
import sys

import pytest
import torch

import memplug
from memplug.backends.triton import interpreting
from memplug.backends.triton import cost_model
from memplug.rules import BUILT_IN_RULES

pytestmark = pytest.mark.skipif(not interpreting(), reason="records and counts kernels in Triton's interpreter "
                                "(TRITON_INTERPRET=1, set by tests/conftest.py without a GPU)")
B, H, K, V = 2, 2, 16, 40  # K != V and V not a multiple of the V block: a swapped or unpadded size shows


def _inputs(rule, T, m, R, dtype, initial_state, seed=0, learned_weights=True):
    torch.manual_seed(seed)
    r = memplug.get_rule(rule)
    x = dict(q=torch.randn(B, T, H, K, dtype=dtype), k=torch.nn.functional.normalize(torch.randn(B, T, H, K), dim=-1),
             v=torch.randn(B, T, H, V, dtype=dtype))
    x["k"] = x["k"].to(dtype)
    if r.g is not None:
        x["g"] = -torch.rand(B, T, H, *((K,) if r.g == "vector" else ()))
    if r.beta:
        x["beta"] = 0.5 * torch.rand(B, T, H)
    x["route_w"], x["route_idx"] = torch.randn(B, T, 1, m).softmax(-1).topk(R, dim=-1)
    if initial_state:
        x["initial_state"] = torch.randn(B, H, m, K, V)
    for name in ("q", "k", "v", "g", "beta", "route_w", "initial_state"):
        if name in x and (learned_weights or name != "route_w"):
            x[name].requires_grad_()
    return x


def _layout(x, m):
    return cost_model.packed_layout(x["route_idx"], m, H, memplug.backends.triton.CHUNK_SIZE)


def _scan(rule, x, m, final_state):
    o, final = memplug.routed_scan(**x, rule=rule, num_slots=m, backend="triton", output_final_state=final_state,
                                   check_values=False)
    loss = o.float().square().sum() + (final.square().sum() if final_state else 0)
    return loss


@pytest.mark.parametrize("rule", BUILT_IN_RULES)
@pytest.mark.parametrize("m, R, learned_weights", [(1, 1, True), (1, 1, False), (4, 2, True)],
                         ids=["one_slot", "one_slot_constant_weight", "routed"])
@pytest.mark.parametrize("states", [False, True], ids=["no_states", "initial_and_final_states"])
def test_model_lists_every_launch_with_the_tensors_it_is_given(rule, m, R, learned_weights, states):
    x = _inputs(rule, 150, m, R, torch.float16, initial_state=states, learned_weights=learned_weights)
    with cost_model.record_traffic() as traffic:
        loss = _scan(rule, x, m, final_state=states)
        traffic.phase = "backward"
        loss.backward()
    recorded = [(x.phase, x.kernel, {n: b for n, (b, _) in x.tensors.items()}) for x in traffic.launches
                if x.kind == "triton"]
    model = cost_model.scan_launches(rule, _layout(x, m), K, V, torch.float16, initial_state=states,
                                     final_state=states, read_w=not learned_weights)
    assert recorded == [(x.phase, x.kernel, {n: b for n, (b, _) in x.tensors.items()}) for x in model]
    assert all(x.bytes > 0 for x in model)
    # The PyTorch side is recorded too (packing, coupling, casts and their adjoints).
    assert any(x.kind == "torch" and x.phase == "backward" for x in traffic.launches)


@pytest.mark.parametrize("rule", BUILT_IN_RULES)
@pytest.mark.parametrize("m, R, dtype", [(1, 1, torch.float16), (4, 2, torch.float32)])
def test_model_flops_are_the_products_the_kernels_execute(rule, m, R, dtype):
    """Counted at the padded block sizes, per precision, for whole and partial chunks and sub-chunks."""
    x = _inputs(rule, 70, m, R, dtype, initial_state=False)
    with cost_model.count_products() as executed:
        _scan(rule, x, m, final_state=False).backward()
    model = cost_model.scan_launches(rule, _layout(x, m), K, V, dtype)
    assert [(name, dict(c)) for name, c in executed] == [(x.kernel, x.flops) for x in model]


@pytest.mark.parametrize("rule", BUILT_IN_RULES)
def test_model_follows_keys_taken_in_blocks(rule, monkeypatch):
    """K = 40 in float32: the kernels that take keys in blocks of 32 columns take two (the second
    ragged), and the gradient kernel runs once per key block, so the model's products and a scalar
    decay's dA (one share per block) must follow; at K = 16 there is one block and neither shows."""
    monkeypatch.setitem(globals(), "K", 40)
    x = _inputs(rule, 70, 4, 2, torch.float32, initial_state=False)
    model = cost_model.scan_launches(rule, _layout(x, 4), K, V, torch.float32)
    with cost_model.count_products() as executed:
        _scan(rule, x, 4, final_state=False).backward()
    assert [(name, dict(c)) for name, c in executed] == [(x.kernel, x.flops) for x in model]
    for p in x.values():
        p.grad = None
    with cost_model.record_traffic() as traffic:
        loss = _scan(rule, x, 4, final_state=False)
        traffic.phase = "backward"
        loss.backward()
    recorded = [(x.phase, x.kernel, {n: b for n, (b, _) in x.tensors.items()}) for x in traffic.launches
                if x.kind == "triton"]
    assert recorded == [(x.phase, x.kernel, {n: b for n, (b, _) in x.tensors.items()}) for x in model]


def test_floor_is_the_slower_of_memory_and_compute():
    launch = cost_model.Launch("k", "forward", tensors={"a": (3_350_000, "r"), "b": (10**9, "unused")},
                               flops={"16-bit": 989e6})
    assert launch.bytes == 3_350_000
    assert launch.floor_seconds("h100") == pytest.approx(1e-6)  # both 1 us
    launch.flops = {"tf32x3": 494.5e6}  # three TF32 passes: 3 us
    assert launch.floor_seconds("h100") == pytest.approx(3e-6)
    assert launch.executed_flops == pytest.approx(3 * 494.5e6)
    launch.flops = {"fp32": 66.9e6}  # on CUDA cores: 1 us
    assert launch.floor_seconds("h100") == pytest.approx(1e-6)


def test_torch_operations_are_charged_what_they_read_and_write():
    x = torch.ones(4, 8)
    assert cost_model.torch_op_bytes("add", [x, x], [x]) == 3 * 128
    assert cost_model.torch_op_bytes("mul", [x, torch.ones(4, 1).expand(4, 8)], [x]) == 128 + 16 + 128
    assert cost_model.torch_op_bytes("view", [x], [x]) == 0
    assert cost_model.torch_op_bytes("new_zeros", [x], [x]) == 128
    assert cost_model.torch_op_bytes("index_copy_", [x, torch.zeros(4, dtype=torch.int64), x], [x]) == 32 + 128 + 128


def test_bench_model_prints_every_path_and_the_goals():
    """`memplug bench --model` in its own process (it turns on the interpreter before fla is imported)."""
    proc = subprocess.run([sys.executable, "-m", "memplug.cli", "bench", "--model", "--B", "1", "--T", "100",
                           "--H", "2", "--K", "16", "--V", "32", "--m", "4", "--R", "2", "--threads", "1"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    for title in ("memplug, m = 1", "fla fla.ops.gated_delta_rule.chunk_gated_delta_rule", "memplug, m = 4, R = 2",
                  "fla MoM path, m = 4, R = 2"):
        assert f"\n{title}\n" in out
    assert out.count("total: forward") == 4
    for goal in ("memplug m = 1 / fla, bytes", "memplug m = 1 / fla, FLOPs", "memplug routed / MoM path, bytes"):
        line = out.split(goal + ": ")[1].split("\n")[0]
        assert line.endswith(("PASS", "MISS")), line


def test_bench_model_names_a_bad_argument():
    proc = subprocess.run([sys.executable, "-m", "memplug.cli", "bench", "--model", "--R", "9", "--m", "4"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "--R: at most --m (4) routes per token, got 9" in proc.stderr
