"""`memplug bench --device cuda`: the `triton` backend against flash-linear-attention on a GPU. Its own
program beside the CPU benchmark (`bench.py`, which hands `--device cuda` here), with its own options
(`cuda_arguments`).

Goals (printed as PASS/MISS, never asserted):
- m = 1 (the plain rule): triton fwd+bwd time within 1.1x of fla's chunk kernel;
- routed, m = 4 and 16, R = 2 (gated_deltanet, MoM's rule): fwd+bwd >= 1.5x faster than fla's MoM
  routing path (fla.layers.mom: transform, unpad, chunk_gated_delta_rule over cu_seqlens, pad,
  reconstruct);
- R = 2 of m = 64: fwd+bwd time <= 0.2x that of dense m = 64 (every slot routed, R = 64); `--sparse-m`
  runs this comparison at another m, without a goal;
- decode: routed_step at >= 50% of the measured memory bandwidth on the bytes it must move.

Each comparison of two computations of the same function (all but R = 2 against dense) first checks
that they agree (`agreement`): outputs and the gradients of q, k, v, or the decode step's output
and state; fla's MoM path with its token sort made stable (`stable_argsort`). The command exits with
status 1 if any check fails.
"""
from __future__ import annotations

import argparse
import contextlib
import sys

import torch

import memplug
from memplug import routed_scan
from memplug.imports import import_object

from .bench import draw_inputs, rule_list
from .config import positive_int

CUDA_GOALS = {  # name -> (comparison, goal)
    "m1_over_fla": ("<=", 1.1),
    "mom_over_routed": (">=", 1.5),
    "sparse_over_dense": ("<=", 0.2),
    "decode_bandwidth": (">=", 0.5),
}
# Largest relative error ||mine - theirs|| / ||theirs|| of forward outputs at which two computations of
# the same function agree, by input dtype: each side's own error should be about 3e-4 in float32
# (fla's float32 products are tf32) and up to 1e-2 with 16-bit operands. Provisional: float16 is
# checked in the interpreter, float32 and bfloat16 have not run compiled yet. Gradients get twice
# these; a decode step's float32 state, STATE_AGREEMENT; and no row (one token and head) may be off
# by more than WORST_ROW times the bound, in units of the mean row's norm, so that a few wrong tokens
# do not hide in the norm of the whole.
AGREEMENT = {torch.float32: 2e-3, torch.float16: 1e-2, torch.bfloat16: 3e-2}
STATE_AGREEMENT = 1e-4
WORST_ROW = 10
SPARSE_GOAL_SLOTS = 64  # the slots at which "sparse_over_dense" is a goal (R = 2 of them)
FLA_PLAIN = {  # rule -> fla chunk op of the plain (m = 1) rule
    "mamba2": "fla.ops.simple_gla.chunk_simple_gla",
    "gla": "fla.ops.gla.chunk_gla",
    "deltanet": "fla.ops.delta_rule.chunk_delta_rule",
    "gated_deltanet": "fla.ops.gated_delta_rule.chunk_gated_delta_rule",
}


def cuda_verdict(name: str, value: float) -> str:
    comparison, goal = CUDA_GOALS[name]
    ok = value >= goal if comparison == ">=" else value <= goal
    return f"goal {comparison} {goal:g}  {'PASS' if ok else 'MISS'}"


def cuda_inputs(rule: str, B: int, T: int, H: int, K: int, V: int, m: int, R: int, dtype, device,
                requires_grad: bool = True, seed: int = 0) -> dict:
    """`routed_scan` keywords for a MoM-like layer: `draw_inputs` with one routing shared by the
    heads and coupling "none" (MoM's); q, k, v in `dtype`, the gates and weights in float32, as MoM
    computes them. With m = 1 every token routes to the one slot with weight 1: the plain rule, whose
    weight is a constant (no gradient), as in a layer with one slot."""
    x = draw_inputs(rule, B, T, H, K, V, 1, m, R, seed)
    learned = lambda n: requires_grad and not (n == "route_w" and m == 1)
    out = {n: t.to(device) if n == "route_idx" else
           t.to(device, dtype if n in ("q", "k", "v") else torch.float32).requires_grad_(learned(n))
           for n, t in x.items()}
    out.update(rule=rule, num_slots=m, coupling="none")
    return out


def fla_mom_path(q, k, v, g, beta, route_idx, route_w, num_slots: int, chunk_fn=None):
    """fla's MoM routing path (`fla.layers.mom.MomAttention.forward`, mode "chunk", without the
    projections) on per-token q, k, v `[B,T,H,.]`, g, beta `[B,T,H]` and a routing shared by the
    heads (route_idx, route_w `[B,T,R]`): `transform` sorts the tokens of each (memory, batch row)
    and pads them to the longest, `_upad_input` removes the padding, `chunk_gated_delta_rule` runs
    over the packed sequences (cu_seqlens), `pad_input` and `reconstruct` scatter the outputs back
    and mix the routes. `chunk_fn` replaces `chunk_gated_delta_rule` (same signature)."""
    from fla.layers.mom import _upad_input, reconstruct, transform
    from fla.layers.utils import pad_input
    if chunk_fn is None:
        from fla.ops.gated_delta_rule import chunk_gated_delta_rule as chunk_fn
    B, T, H, K = q.shape
    V, R, m = v.shape[-1], route_idx.shape[-1], num_slots
    mask = torch.zeros(B, T, m, dtype=torch.int32, device=q.device).scatter(-1, route_idx, 1)
    x = torch.cat([q.flatten(2), k.flatten(2), v.flatten(2)], -1)
    x, indices, sorted_indices, max_len, token_mask, mask_2 = transform(x, mask, m, route_idx, None)
    gates = torch.cat([g.float(), beta.float()], -1)  # float32, as MoM computes them
    gates = transform(gates, mask, m, route_idx, None)[0]
    flat = lambda t: t.reshape(m * B, max_len, *t.shape[3:])
    x, gates, mask_2 = flat(x), flat(gates), mask_2.reshape(m * B, max_len)
    qs, ks, vs = x.split([H * K, H * K, H * V], -1)
    gs, bs = gates.split([H, H], -1)
    qs, ks, vs, gs, bs, indices_q, cu_all, _ = _upad_input(qs, ks, vs, gs, bs, mask_2)
    cu_seqlens = cu_all[0].to(torch.long).unique()
    o, _ = chunk_fn(q=qs.view(1, -1, H, K), k=ks.view(1, -1, H, K), v=vs.view(1, -1, H, V), g=gs[None],
                    beta=bs[None], cu_seqlens=cu_seqlens)
    o = pad_input(o[0], indices_q, m * B, max_len).reshape(m, B, max_len, H * V)
    o = reconstruct(o, indices=indices, sorted_indices=sorted_indices, batch_size=B, seq_len=T, topk=R,
                    routing_weights=route_w.to(o.dtype), mask=token_mask)
    return o.view(B, T, H, V)


@contextlib.contextmanager
def stable_argsort():
    """Within the block, `Tensor.argsort` sorts stably. fla's MoM `transform` orders each memory's
    tokens with a plain argsort, which need not keep equal keys in order (on the CPU it does not,
    beyond 16 entries): the tokens of a memory then run out of time order. The agreement check of the
    MoM path runs under this, so that it checks the path's plumbing; its timing runs as fla wrote it."""
    argsort = torch.Tensor.argsort
    torch.Tensor.argsort = lambda self, dim=-1, descending=False, **kw: argsort(self, dim=dim, descending=descending,
                                                                                stable=True)
    try:
        yield
    finally:
        torch.Tensor.argsort = argsort


def agreement(label: str, pairs: dict, failures: list) -> None:
    """Prints whether two computations of the same function agree: `pairs` maps a name to (mine,
    theirs, bound) with bound on ||mine - theirs|| / ||theirs||, and on each row's error over the mean
    row norm, WORST_ROW times the bound (rows: the last dimension). Appends `label` to `failures` if
    any pair is off (NaN never agrees)."""
    parts, ok = [], True
    for name, (mine, theirs, bound) in pairs.items():
        mine, theirs = mine.detach().double().flatten(0, -2), theirs.detach().double().flatten(0, -2)
        error = ((mine - theirs).norm() / theirs.norm()).item()
        worst = ((mine - theirs).norm(dim=-1).max() / theirs.norm(dim=-1).mean()).item()
        ok &= error <= bound and worst <= WORST_ROW * bound  # False for NaN
        parts.append(f"{name} {error:.1e} (row {worst:.1e}; <= {bound:g})")
    print(f"  {label}: agree? {', '.join(parts)}  {'yes' if ok else 'NO'}")
    if not ok:
        failures.append(label)


def outputs_and_gradients(mine, theirs, leaves: dict, dtype) -> dict:
    """`agreement`'s pairs for two functions of `leaves` (name -> tensor): their outputs and the
    gradients of the leaves for one fixed random cotangent."""
    results = []
    for run in (mine, theirs):
        o = run()
        gen = torch.Generator(device=o.device).manual_seed(1)
        do = torch.randn(o.shape, generator=gen, device=o.device, dtype=o.dtype)
        results.append([o, *torch.autograd.grad(o, list(leaves.values()), do)])
    names = ["o"] + [f"d{n}" for n in leaves]
    bounds = [AGREEMENT[dtype]] + [2 * AGREEMENT[dtype]] * len(leaves)
    return {n: (a, b, bound) for n, a, b, bound in zip(names, *results, bounds)}


def _bench_ms(fn, smoke: bool) -> float:
    import triton.testing
    return triton.testing.do_bench(fn, warmup=2 if smoke else 25, rep=5 if smoke else 200, return_mode="median")


def _fwd_bwd(run, leaves, out_grad_seed=0):
    """A closure that runs `run()` (returning o) and backpropagates a fixed random cotangent."""
    state = {}

    def step():
        o = run()
        if "do" not in state:
            gen = torch.Generator(device=o.device).manual_seed(out_grad_seed)
            state["do"] = torch.randn(o.shape, generator=gen, device=o.device, dtype=o.dtype)
        torch.autograd.backward(o, state["do"])
        for x in leaves:
            x.grad = None
    return step


def measured_peaks(dtype, device, time_ms, smoke: bool):
    """(memory bandwidth in bytes/s, matmul rate in FLOP/s in `dtype`) measured on `device` with the
    timer `time_ms(fn) -> ms`: a large device-to-device copy, and a square matmul."""
    n = (1 << 24) if smoke else (1 << 28)  # bytes copied each way: 16 MiB (smoke) or 256 MiB
    src = torch.empty(n, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    bandwidth = 2 * n / (time_ms(lambda: dst.copy_(src)) * 1e-3)
    s = 1024 if smoke else 8192
    a = torch.randn(s, s, device=device, dtype=dtype)
    b = torch.randn(s, s, device=device, dtype=dtype)
    matmul = 2 * s ** 3 / (time_ms(lambda: a @ b) * 1e-3)
    return bandwidth, matmul


def cuda_arguments(argv=None) -> argparse.Namespace:
    """The options of `memplug bench --device cuda`; `--smoke` replaces the shapes by tiny ones."""
    parser = argparse.ArgumentParser(prog="memplug bench --device cuda",
                                     description="the triton backend against flash-linear-attention on a GPU")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    for size, default in (("B", 8), ("T", 2048), ("H", 16), ("K", 128), ("V", 128)):
        parser.add_argument(f"--{size}", type=positive_int, default=default)
    parser.add_argument("--rule", type=rule_list(FLA_PLAIN), default="mamba2,gla,deltanet,gated_deltanet",
                        help=f"rules of the m = 1 comparison, of {list(FLA_PLAIN)}")
    parser.add_argument("--sparse-T", type=positive_int, default=512,
                        help="tokens per row of the sparse vs dense comparison")
    parser.add_argument("--sparse-m", type=positive_int, default=SPARSE_GOAL_SLOTS,
                        help=f"slots of that comparison (its goal is for m = {SPARSE_GOAL_SLOTS}, none at another m)")
    parser.add_argument("--decode-B", type=positive_int, default=64)
    parser.add_argument("--smoke", action="store_true", help="tiny shapes, few repeats: checks that everything runs")
    parser.add_argument("--backend", default="triton", help=argparse.SUPPRESS)  # accepted for symmetry
    args = parser.parse_args(argv)
    if args.sparse_m < 2:
        parser.error(f"argument --sparse-m: its comparison routes R = 2, so it needs at least 2 slots, "
                     f"got {args.sparse_m}")
    if args.smoke:
        args.B, args.T, args.H, args.K, args.V, args.sparse_T, args.decode_B = 1, 64, 2, 32, 32, 32, 4
    return args


def main(argv=None) -> int:
    """`memplug bench --device cuda [options]`: see the module docstring."""
    args = cuda_arguments(argv)
    if not torch.cuda.is_available():
        raise SystemExit("memplug bench --device cuda: no CUDA GPU here (torch.cuda.is_available() is False). "
                         "The CUDA benchmark times the triton backend's compiled kernels against "
                         "flash-linear-attention and needs a GPU; on a CPU run `memplug bench` (chunked backend).")
    if args.backend != "triton" or "triton" not in memplug.available_backends():
        raise SystemExit("memplug bench --device cuda: benchmarks the 'triton' backend, which is not available "
                         f"(available: {memplug.available_backends()})")
    dev = torch.device(args.device)
    time_ms = lambda fn: _bench_ms(fn, args.smoke)
    print(f"memplug bench: triton backend on {torch.cuda.get_device_name(dev)}, {args.dtype}; "
          f"B={args.B} T={args.T} H={args.H} K={args.K} V={args.V}; times: median of triton.testing.do_bench")
    failures = triton_against_fla(args, dev, time_ms)
    if failures:
        print(f"\noutputs differ in {len(failures)} comparison(s): {', '.join(failures)}")
    return 1 if failures else 0


def triton_against_fla(args, dev, time_ms) -> list:
    """The four comparisons of the CUDA section on device `dev`, every time taken by `time_ms(fn) ->
    ms`; returns the labels of those whose two sides computed different outputs. (The tests run this
    on the CPU in Triton's interpreter, with fla's kernels patched to run there: that checks that
    every comparison runs and agrees; its times say nothing about a GPU.)"""
    dtype = getattr(torch, args.dtype)
    failures = []
    B, T, H, K, V = args.B, args.T, args.H, args.K, args.V
    bandwidth, matmul = measured_peaks(dtype, dev, time_ms, args.smoke)
    print(f"measured peaks: memory bandwidth {bandwidth / 1e9:,.0f} GB/s (device copy), "
          f"{args.dtype} matmul {matmul / 1e12:,.1f} TFLOP/s")
    print("achieved fractions below: bytes and FLOPs of memplug's Triton kernels for the same work, by the model "
          "of `memplug bench --model` (backends/triton/cost_model.py; PyTorch operations not included)")
    from memplug.backends.triton import CHUNK_SIZE
    from memplug.backends.triton.cost_model import balanced_layout, scan_launches, totals

    def timed(label, run, leaves, rule, m, R, T=T):
        """Forward and forward+backward times (ms) of `run`, with tokens/s and the achieved fractions
        of the measured bandwidth and matmul rate (the kernel model at `rule`, m, R, T)."""
        fwd = time_ms(lambda: run())
        both = time_ms(_fwd_bwd(run, leaves))
        cost = totals(scan_launches(rule, balanced_layout(B, T, H, m, R, 1, CHUNK_SIZE), K, V, dtype), "h100")
        b_fwd, f_fwd = cost["forward"]["bytes"], cost["forward"]["flops"]
        b_all, f_all = b_fwd + cost["backward"]["bytes"], f_fwd + cost["backward"]["flops"]
        tokens = B * T
        print(f"  {label:34s} fwd {fwd:8.3f} ms {tokens / fwd / 1e3:8.2f} Mtok/s"
              f"  bw {b_fwd / fwd / 1e-3 / bandwidth:5.1%}  mm {f_fwd / fwd / 1e-3 / matmul:5.1%}"
              f" | fwd+bwd {both:8.3f} ms {tokens / both / 1e3:8.2f} Mtok/s"
              f"  bw {b_all / both / 1e-3 / bandwidth:5.1%}  mm {f_all / both / 1e-3 / matmul:5.1%}")
        return both

    # 1. m = 1 against fla's chunk kernels
    print("\nm = 1 (plain rule): triton vs fla")
    for rule in args.rule:
        x = cuda_inputs(rule, B, T, H, K, V, 1, 1, dtype, dev)
        leaves = [x[n] for n in ("q", "k", "v", "g", "beta", "route_w") if n in x]
        mine = timed(f"{rule} triton", lambda: routed_scan(**x, backend="triton")[0], leaves, rule, 1, 1)
        if rule == "deltanet" and dtype == torch.float32:  # fla's chunk_delta_rule asserts this
            print("  deltanet: fla's chunk_delta_rule takes no float32 inputs: no comparison in float32")
            continue
        op = import_object(FLA_PLAIN[rule])
        fla_kw = {n: x[n] for n in ("g", "beta") if n in x}
        if rule == "deltanet":
            fla_run = lambda: op(x["q"], x["k"], x["v"], x["beta"])[0]
        else:
            fla_run = lambda: op(x["q"], x["k"], x["v"], **fla_kw)[0]
        theirs = timed(f"{rule} fla {FLA_PLAIN[rule].rsplit('.', 1)[1]}", fla_run, leaves, rule, 1, 1)
        agreement(f"{rule} triton vs fla", outputs_and_gradients(lambda: routed_scan(**x, backend="triton")[0],
                                                                 fla_run, {n: x[n] for n in "qkv"}, dtype), failures)
        print(f"  {rule}: triton / fla fwd+bwd = {mine / theirs:.2f}   {cuda_verdict('m1_over_fla', mine / theirs)}")

    # 2. routed gated_deltanet against fla's MoM path
    print("\nrouted gated_deltanet, R = 2, routing shared by the heads: triton vs fla's MoM path")
    for m in (4, 16):
        x = cuda_inputs("gated_deltanet", B, T, H, K, V, m, 2, dtype, dev)
        leaves = [x[n] for n in ("q", "k", "v", "g", "beta", "route_w")]
        mine = timed(f"m={m} triton", lambda: routed_scan(**x, backend="triton")[0], leaves, "gated_deltanet", m, 2)
        mom = lambda: fla_mom_path(x["q"], x["k"], x["v"], x["g"], x["beta"], x["route_idx"][:, :, 0],
                                   x["route_w"][:, :, 0], m)
        theirs = timed(f"m={m} fla MoM path", mom, leaves, "gated_deltanet", m, 2)
        with stable_argsort():
            pairs = outputs_and_gradients(lambda: routed_scan(**x, backend="triton")[0], mom,
                                          {n: x[n] for n in "qkv"}, dtype)
        agreement(f"m={m} triton vs fla MoM path (sort made stable)", pairs, failures)
        ratio = theirs / mine
        print(f"  m={m}: fla MoM / triton fwd+bwd = {ratio:.2f}   {cuda_verdict('mom_over_routed', ratio)}")

    # 3. R = 2 of m slots against dense (every slot routed)
    m = args.sparse_m
    print(f"\nm = {m} slots, T = {args.sparse_T}: R = 2 vs dense (R = {m}), gated_deltanet, triton")
    times = {}
    for R in (2, m):
        x = cuda_inputs("gated_deltanet", B, args.sparse_T, H, K, V, m, R, dtype, dev)
        leaves = [x[n] for n in ("q", "k", "v", "g", "beta", "route_w")]
        times[R] = timed(f"R={R}", lambda: routed_scan(**x, backend="triton")[0], leaves, "gated_deltanet", m, R,
                         T=args.sparse_T)
    ratio = times[2] / times[m]
    verdict = (cuda_verdict("sparse_over_dense", ratio) if m == SPARSE_GOAL_SLOTS
               else f"(no goal: it is for m = {SPARSE_GOAL_SLOTS})")
    print(f"  R=2 / dense fwd+bwd = {ratio:.3f}   {verdict}")

    # 4. decode
    print(f"\ndecode, one token, B={args.decode_B}: triton routed_step vs fla fused_recurrent_gated_delta_rule (m = 1)")
    fused = import_object("fla.ops.gated_delta_rule.fused_recurrent_gated_delta_rule")
    for m, R in ((1, 1), (16, 2)):
        x = cuda_inputs("gated_deltanet", args.decode_B, 1, H, K, V, m, R, dtype, dev, requires_grad=False)
        state = torch.randn(args.decode_B, H, m, K, V, device=dev)  # never zeros: they hide unwritten memory
        step_kw = {n: x[n] for n in ("q", "k", "v", "g", "beta", "route_idx", "route_w", "rule", "coupling")}
        with torch.no_grad():
            o, after = memplug.routed_step(**step_kw, state=state.clone(), backend="triton")
            if m == 1:
                expected, expected_after = fused(x["q"], x["k"], x["v"], g=x["g"], beta=x["beta"],
                                                 initial_state=state[:, :, 0], output_final_state=True)
                after, label = after[:, :, 0], "m=1 triton vs fla fused_recurrent_gated_delta_rule"
            else:
                expected, expected_after = memplug.routed_step(**step_kw, state=state.clone(), backend="reference")
                label = f"m={m} R={R} triton vs reference"
            agreement(label, {"o": (o, expected, AGREEMENT[dtype]),
                              "state": (after, expected_after, STATE_AGREEMENT)}, failures)
            ms = time_ms(lambda: memplug.routed_step(**step_kw, state=state, backend="triton"))  # state advances
        moved = args.decode_B * H * R * K * V * 4 * 2  # the routed slots' states, read and written
        frac = moved / (ms * 1e-3) / bandwidth
        print(f"  m={m:3d} R={R}: triton {ms * 1e3:8.1f} us, {moved / 2**20:8.1f} MiB of state moved, "
              f"{frac:6.1%} of measured bandwidth   {cuda_verdict('decode_bandwidth', frac)}")
        if m == 1:
            s0 = torch.randn(args.decode_B, H, K, V, device=dev)
            with torch.no_grad():
                fla_ms = time_ms(lambda: fused(x["q"], x["k"], x["v"], g=x["g"], beta=x["beta"], initial_state=s0,
                                               output_final_state=True))
            print(f"        fla fused_recurrent_gated_delta_rule {fla_ms * 1e3:8.1f} us "
                  f"(triton / fla = {ms / fla_ms:.2f})")
    return failures


if __name__ == "__main__":
    sys.exit(main())
