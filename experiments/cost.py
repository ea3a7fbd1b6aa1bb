"""`memplug bench --model`: HBM bytes, FLOPs and roofline floors of a forward and backward pass, per
kernel, for memplug's Triton backend and flash-linear-attention at the same shape, without a GPU.

    memplug bench --model [--rule gated_deltanet] [--B 8 --T 4096 --H 16 --K 128 --V 128]
                          [--m 8 --R 2] [--dtype bfloat16] [--gpu h100]

Four paths (`memplug.backends.triton.cost_model` says what is modelled and how):

- memplug at m = 1 (the plain rule) and memplug routed (m slots, R routes, one routing shared by
  the heads, coupling "none", as MoM): Triton kernels from the analytic model, checked here against
  the tensors the kernels are given in this very run; PyTorch operations counted.
- fla's chunk kernel of the plain rule (m = 1), and fla's MoM routing path (gated_deltanet: transform,
  unpad, `chunk_gated_delta_rule` over the packed sequences, pad, reconstruct) at m, R: bytes counted
  from the tensors fla's kernels are given and from its PyTorch operations; FLOPs counted from the
  products fla's kernels execute in Triton's interpreter on two chunks of one head, scaled by the
  number of chunk-heads (fla's kernels work chunk by chunk, so their products scale with it).

The run records, it does not compute: Triton launches are replaced by records, so the full shape runs
on a CPU in seconds (inputs as large as the shape asks for are allocated). Goals of the Triton issue,
printed PASS/MISS from the model: memplug m = 1 within 1.05x of fla's bytes; routed at most 0.6x
the MoM path's bytes; the delta rule's FLOPs within 1.2x of fla's.
"""
from __future__ import annotations

import argparse
import collections
import sys
import warnings

import torch

MODEL_GOALS = {  # name -> (comparison, goal)
    "m1_bytes_over_fla": ("<=", 1.05),
    "routed_bytes_over_mom": ("<=", 0.6),
    "flops_over_fla": ("<=", 1.2),
}


def model_verdict(name: str, value: float) -> str:
    comparison, goal = MODEL_GOALS[name]
    ok = value >= goal if comparison == ">=" else value <= goal
    return f"goal {comparison} {goal:g}  {'PASS' if ok else 'MISS'}"


def _record(run, inputs: dict) -> list:
    """Launches of `run()` (forward) and of its backward, recorded (`cost_model.record_traffic`)."""
    from memplug.backends.triton.cost_model import record_traffic

    with record_traffic() as traffic:
        o = run()
        traffic.paused = True
        do = torch.ones_like(o)  # the caller's gradient: not part of the pass
        traffic.paused = False
        traffic.phase = "backward"
        torch.autograd.backward(o, do)
    for x in inputs.values():
        if isinstance(x, torch.Tensor):
            x.grad = None
    return traffic.launches


def memplug_path(x: dict, B, T, H, K, V, m, R, dtype) -> list:
    """memplug's launches: the analytic kernels (checked against the recorded ones) and the recorded
    PyTorch operations."""
    from memplug import routed_scan
    from memplug.backends.triton import CHUNK_SIZE
    from memplug.backends.triton.cost_model import packed_layout, scan_launches

    recorded = _record(lambda: routed_scan(**x, backend="triton", check_values=False)[0], x)
    folded = m == 1 and not x["route_w"].requires_grad  # the constant weight 1 goes into the output kernel
    model = scan_launches(x["rule"], packed_layout(x["route_idx"], m, H, CHUNK_SIZE), K, V, dtype, read_w=folded)
    kernels = [r for r in recorded if r.kind == "triton"]
    given = lambda launch: {n: b for n, (b, _) in launch.tensors.items()}
    if [(r.kernel, given(r)) for r in kernels] != [(r.kernel, given(r)) for r in model]:
        raise RuntimeError("memplug bench --model: the analytic model of the Triton kernels differs from the "
                           "tensors the kernels were given: update backends/triton/cost_model.py")
    return model + [r for r in recorded if r.kind == "torch"]


def fla_flops_per_chunk_head(run_small) -> dict:
    """{kernel: {precision: FLOPs}} executed by fla's kernels in `run_small()` (forward and backward
    on two chunks of one head), per chunk-head: Triton's interpreter runs them, counting products."""
    from memplug.backends.triton.cost_model import count_products

    per_kernel = collections.defaultdict(collections.Counter)
    with count_products() as counts, warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # random inputs overflow some of fla's float16 products
        run_small()
    for kernel, counted in counts:
        per_kernel[kernel].update(counted)
    return {kernel: {p: f / 2 for p, f in c.items()} for kernel, c in per_kernel.items()}


def with_fla_flops(launches: list, per_chunk_head: dict, chunk_heads: int) -> list:
    """`launches` with the FLOPs of each fla kernel: its count per chunk-head times `chunk_heads`."""
    for launch in launches:
        if launch.kind == "triton":
            launch.flops = {p: f * chunk_heads for p, f in per_chunk_head.get(launch.kernel, {}).items()}
    return launches


def fla_plain_path(rule: str, x: dict, BT: int, K: int, V: int, dtype) -> list:
    """fla's chunk kernel of the plain rule (`fla_plain`) on `x`, with the rule's g and beta."""
    from memplug.imports import import_object
    op = import_object(fla_plain()[rule])
    B, T, H = x["q"].shape[:3]
    call = lambda t: op(t["q"], t["k"], t["v"], **{n: t[n] for n in ("g", "beta") if n in t})[0]
    launches = _record(lambda: call(x), x)
    small = _small_inputs(rule, BT, K, V, dtype)
    flops = fla_flops_per_chunk_head(lambda: _forward_backward(lambda: call(small)))
    return with_fla_flops(launches, flops, B * -(-T // BT) * H)


def fla_plain() -> dict:
    """rule -> fla's chunk op of the plain rule: the GPU benchmark's, and fla's KDA kernel."""
    from .bench_cuda import FLA_PLAIN
    return {**FLA_PLAIN, "kda": "fla.ops.kda.chunk_kda"}


def _forward_backward(run) -> None:
    o = run()
    torch.autograd.backward(o, torch.ones_like(o))


def fla_mom_launches(x: dict, m: int, num_chunks: int, BT: int, K: int, V: int, dtype) -> list:
    """fla's MoM path (`bench_cuda.fla_mom_path`) on `x`; its packed sequences are memplug's (one per
    batch row and slot), so its chunk-heads are `num_chunks` (memplug's layout) times the heads."""
    from .bench_cuda import fla_mom_path

    H = x["q"].shape[2]
    run = lambda t: fla_mom_path(t["q"], t["k"], t["v"], t["g"], t["beta"], t["route_idx"][:, :, 0],
                                 t["route_w"][:, :, 0], m)
    launches = _record(lambda: run(x), x)
    small = _small_inputs("gated_deltanet", BT, K, V, dtype)
    from memplug.imports import import_object
    chunk = import_object(fla_plain()["gated_deltanet"])
    call = lambda: chunk(small["q"], small["k"], small["v"], g=small["g"], beta=small["beta"])[0]
    flops = fla_flops_per_chunk_head(lambda: _forward_backward(call))
    return with_fla_flops(launches, flops, num_chunks * H)


def _small_inputs(rule: str, BT: int, K: int, V: int, dtype) -> dict:
    """Inputs of two chunks of one head, for counting fla's products in the interpreter."""
    from .bench_cuda import cuda_inputs
    return cuda_inputs(rule, 1, 2 * BT, 1, K, V, 1, 1, dtype, "cpu")


def print_path(title: str, launches: list, rows: int, gpu: str) -> dict:
    """Per Triton kernel (and the PyTorch operations of each phase together): bytes, GFLOP and floor;
    returns the totals."""
    from memplug.backends.triton.cost_model import totals

    print(f"\n{title}")
    print(f"  {'phase':8s} {'kernel':52s} {'MB':>10s} {'B/row':>8s} {'GFLOP':>9s} {'floor us':>9s}")
    for phase in ("forward", "backward"):
        chosen = [x for x in launches if x.phase == phase]
        torch_ops = [x for x in chosen if x.kind == "torch"]
        for x in [x for x in chosen if x.kind == "triton"]:
            print(f"  {phase:8s} {x.kernel:52s} {x.bytes / 1e6:10.1f} {x.bytes / rows:8.0f} "
                  f"{x.executed_flops / 1e9:9.2f} {x.floor_seconds(gpu) * 1e6:9.1f}")
        if torch_ops:
            nbytes = sum(x.bytes for x in torch_ops)
            seconds = sum(x.floor_seconds(gpu) for x in torch_ops)
            print(f"  {phase:8s} {f'PyTorch operations ({len(torch_ops)})':52s} {nbytes / 1e6:10.1f} "
                  f"{nbytes / rows:8.0f} {'':9s} {seconds * 1e6:9.1f}")
    total = totals(launches, gpu)
    both = {k: total["forward"][k] + total["backward"][k] for k in ("bytes", "flops", "seconds")}
    print(f"  total: forward {total['forward']['bytes'] / rows:,.0f} B/row, backward "
          f"{total['backward']['bytes'] / rows:,.0f} B/row, fwd+bwd {both['bytes'] / rows:,.0f} B/row "
          f"({both['bytes'] / 1e9:.2f} GB), {both['flops'] / 1e9:,.1f} GFLOP executed, floor "
          f"{both['seconds'] * 1e3:.3f} ms")
    return both


def model_arguments(argv=None) -> argparse.Namespace:
    from memplug.backends.triton.cost_model import GPUS
    parser = argparse.ArgumentParser(prog="memplug bench --model", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", action="store_true", help="this program (bytes, FLOPs and floors by model)")
    parser.add_argument("--rule", default="gated_deltanet")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--B", type=int, default=8)
    parser.add_argument("--T", type=int, default=4096)
    parser.add_argument("--H", type=int, default=16)
    parser.add_argument("--K", type=int, default=128)
    parser.add_argument("--V", type=int, default=128)
    parser.add_argument("--m", type=int, default=8, help="slots of the routed path")
    parser.add_argument("--R", type=int, default=2, help="routes per token of the routed path")
    parser.add_argument("--gpu", default="h100", choices=sorted(GPUS))
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    args = parser.parse_args(argv)
    for name in ("B", "T", "H", "K", "V", "m", "R", "threads"):
        if getattr(args, name) < 1:
            parser.error(f"--{name}: must be a positive integer, got {getattr(args, name)}")
    if args.R > args.m:
        parser.error(f"--R: at most --m ({args.m}) routes per token, got {args.R}")
    import memplug
    if args.rule not in memplug.available_rules():
        parser.error(f"--rule: {args.rule!r} is not one of {memplug.available_rules()}")
    return args


def main(argv=None) -> int:
    from memplug.adapters import enable_triton_interpreter
    # First, before triton or fla are imported: their kernels must be interpreted functions to be recorded.
    enable_triton_interpreter()
    args = model_arguments(argv)
    from memplug.backends.triton import CHUNK_SIZE as BT
    from memplug.backends.triton.cost_model import GPUS, packed_layout

    from .bench_cuda import cuda_inputs

    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    B, T, H, K, V, m, R = args.B, args.T, args.H, args.K, args.V, args.m, args.R
    name, bandwidth, rates = GPUS[args.gpu]
    print(f"memplug bench --model: {args.rule}, B={B} T={T} H={H} K={K} V={V}, {args.dtype}, chunks of {BT}; "
          f"floors on {name} ({bandwidth / 1e12:.2f} TB/s, {rates['16-bit'] / 1e12:.0f} TFLOP/s 16-bit, "
          f"{rates['tf32'] / 1e12:.0f} TFLOP/s tf32)")
    print("bytes: every tensor a kernel or PyTorch operation reads or writes, once; a row is one (token, head) at "
          "m = 1 and one (route entry, head) when routed; FLOPs: tensor-core products as executed")

    plain = cuda_inputs(args.rule, B, T, H, K, V, 1, 1, dtype, "cpu")
    mine1 = print_path("memplug, m = 1", memplug_path(plain, B, T, H, K, V, 1, 1, dtype), B * T * H, args.gpu)
    verdicts = []
    if args.rule in fla_plain():
        fla1 = print_path(f"fla {fla_plain()[args.rule]}", fla_plain_path(args.rule, plain, BT, K, V, dtype),
                          B * T * H, args.gpu)
        verdicts += [("memplug m = 1 / fla, bytes", mine1["bytes"] / fla1["bytes"], "m1_bytes_over_fla"),
                     ("memplug m = 1 / fla, FLOPs", mine1["flops"] / fla1["flops"], "flops_over_fla"),
                     ("memplug m = 1 / fla, floor", mine1["seconds"] / fla1["seconds"], None)]
    else:
        print(f"\nfla has no chunk kernel of {args.rule}: no comparison at m = 1")
    del plain

    routed = cuda_inputs(args.rule, B, T, H, K, V, m, R, dtype, "cpu")
    rows = B * T * R * H
    mine = print_path(f"memplug, m = {m}, R = {R}", memplug_path(routed, B, T, H, K, V, m, R, dtype), rows, args.gpu)
    if args.rule == "gated_deltanet":
        NT = packed_layout(routed["route_idx"], m, H, BT).NT
        mom = print_path(f"fla MoM path, m = {m}, R = {R}", fla_mom_launches(routed, m, NT, BT, K, V, dtype),
                         rows, args.gpu)
        verdicts += [("memplug routed / MoM path, bytes", mine["bytes"] / mom["bytes"], "routed_bytes_over_mom"),
                     ("memplug routed / MoM path, floor", mine["seconds"] / mom["seconds"], None)]
    else:
        print("\nfla's MoM path runs gated_deltanet only: no routed comparison")
    print("\nratios")
    for label, value, goal in verdicts:
        print(f"  {label}: {value:.2f}" + (f"   {model_verdict(goal, value)}" if goal else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
