"""`memplug bench`: speed and memory of a backend, and its three goals.

For each rule it times one layer-like `routed_scan` (forward alone, and forward + backward) at the
base shape, at a long sequence and with many slots, measures peak memory, and checks:

- speed-up over the `reference` backend at the base length (forward + backward), goal >= 20;
- time at the long length over time at the base length, goal <= 10 (8x the tokens: about linear);
- time with many slots over time with few (same R), goal <= 1.5 (work follows R*T, not m*T);
- for `kda` (a delta rule with a decay per key channel), its time over `gated_deltanet`'s (the same
  delta rule with one decay per head) at the base shape, forward + backward, goal <= 3.

Times are the best of `--repeats` rounds after a warm-up round, so that other work on the machine
inflates them as little as possible; the three shapes take turns within each round. The reference
is timed on `--ref-tokens` tokens and scaled linearly to the base length (it steps token by token,
so its time is linear in the tokens).

    memplug bench [--backend chunked] [--device cpu] [--rule gated_deltanet,fm] [--threads 2] ...
    python -m memplug.experiments.bench ...

`memplug bench --device cuda` runs the GPU program instead (`bench_cuda.py`), `memplug bench
--peers` the comparison with the CPU peers (`peers.py`) and `memplug bench --model` the performance
model of the Triton kernels against fla's (`cost.py`).
"""
from __future__ import annotations

import argparse
import ctypes
import sys
import time
from dataclasses import dataclass, replace

import torch

import memplug
from memplug import routed_scan

from .config import positive_int

GOALS = {  # name -> (comparison, goal)
    "vs_reference": (">=", 20.0),
    "long_over_base": ("<=", 10.0),
    "many_over_few_slots": ("<=", 1.5),
    "over_scalar_decay": ("<=", 3.0),
}
# A rule held to the speed of its scalar-decay counterpart, timed alongside it.
SCALAR_DECAY_PEER = {"kda": "gated_deltanet"}


@dataclass(frozen=True)
class Case:
    rule: str
    T: int
    m: int
    R: int
    B: int
    H: int
    K: int
    V: int
    shared_routing: bool
    dtype: str
    device: str

    @property
    def tokens(self) -> int:
        return self.B * self.T


def rule_list(allowed=None):
    """An argparse type: comma-separated rule names, each registered (and among `allowed`, when given)."""
    def parse(text: str) -> list[str]:
        known = memplug.available_rules() if allowed is None else [r for r in allowed if r in memplug.available_rules()]
        rules = text.split(",")
        for rule in rules:
            if rule not in known:
                raise argparse.ArgumentTypeError(f"{rule!r} is not one of {known}")
        return rules
    return parse


def draw_inputs(rule: str, B: int, T: int, H: int, K: int, V: int, Hr: int, m: int, R: int, seed: int = 0) -> dict:
    """Layer-like float32 `routed_scan` tensors on the CPU: unit keys, decays in [-0.1, 0], write
    strengths in (0, 1), top-R of random logits with softmax weights (sum <= 1, so rule fm's gate
    w * beta stays <= 1; with m = 1 the one route has weight 1), `Hr` routing head groups."""
    gen = torch.Generator().manual_seed(seed)
    r = memplug.get_rule(rule)
    randn = lambda *shape: torch.randn(*shape, generator=gen)
    x = dict(q=randn(B, T, H, K), k=torch.nn.functional.normalize(randn(B, T, H, K), dim=-1), v=randn(B, T, H, V))
    if r.g == "scalar":
        x["g"] = -0.1 * torch.rand(B, T, H, generator=gen)
    elif r.g == "vector":
        x["g"] = -0.1 * torch.rand(B, T, H, K, generator=gen)
    if r.beta:
        x["beta"] = torch.rand(B, T, H, generator=gen)
    top = randn(B, T, Hr, m).topk(R, dim=-1)
    x["route_w"], x["route_idx"] = top.values.softmax(-1), top.indices
    return x


def make_inputs(case: Case, requires_grad: bool, seed: int = 0) -> dict:
    """`draw_inputs` of a benchmark case, every float input in the case's dtype."""
    x = draw_inputs(case.rule, case.B, case.T, case.H, case.K, case.V, 1 if case.shared_routing else case.H,
                    case.m, case.R, seed)
    dtype = getattr(torch, case.dtype)
    return {n: t.to(case.device) if n == "route_idx" else t.to(case.device, dtype).requires_grad_(requires_grad)
            for n, t in x.items()}


def run_once(case: Case, backend: str, inputs: dict, backward: bool) -> None:
    with torch.set_grad_enabled(backward):
        o, _ = routed_scan(rule=case.rule, num_slots=case.m, backend=backend, **inputs)
        if backward:
            o.float().square().mean().backward()
    if case.device.startswith("cuda"):
        torch.cuda.synchronize()


def best_times(cases: dict, backend: str, backward: bool, repeats: int) -> dict:
    """Best time of each case over `repeats` rounds after a warm-up. The cases take turns within
    each round, so that a change in the machine's load affects them alike and spares their ratios."""
    inputs = {label: make_inputs(case, backward) for label, case in cases.items()}
    best = {label: float("inf") for label in cases}
    for round in range(1 + repeats):  # round 0 warms up
        for label, case in cases.items():
            start = time.perf_counter()
            run_once(case, backend, inputs[label], backward)
            if round > 0:
                best[label] = min(best[label], time.perf_counter() - start)
    return best


def _proc_status(field: str) -> int:
    """A memory figure of /proc/self/status, in bytes."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise OSError(f"/proc/self/status has no {field}")


def peak_memory(case: Case, backend: str) -> float:
    """Peak memory of one forward + backward beyond what was in use before it, in MiB."""
    inputs = make_inputs(case, True)
    if case.device.startswith("cuda"):
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        run_once(case, backend, inputs, True)
        return (torch.cuda.max_memory_allocated() - before) / 2**20
    try:
        # Return the allocator's free memory to the system, so that RSS counts live memory only,
        # then reset the peak RSS (VmHWM) to the current RSS. Linux with glibc only.
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        before = _proc_status("VmRSS")
    except OSError:
        return float("nan")
    run_once(case, backend, inputs, True)
    return (_proc_status("VmHWM") - before) / 2**20


MEMORY_METHOD = {
    "cpu": "rise of the peak RSS over one forward+backward (Linux VmHWM after glibc malloc_trim and a reset "
           "through /proc/self/clear_refs); includes allocator overhead",
    "cuda": "torch.cuda.max_memory_allocated over one forward+backward, beyond the inputs",
}


def verdict(name: str, value: float) -> str:
    comparison, goal = GOALS[name]
    ok = value >= goal if comparison == ">=" else value <= goal
    return f"goal {comparison} {goal:g}  {'PASS' if ok else 'MISS'}"


def bench_rule(case: Case, args) -> None:
    cases = {"base": case, "long": replace(case, T=args.long_T), "many": replace(case, m=args.many_slots)}
    peer = SCALAR_DECAY_PEER.get(case.rule)
    forward = best_times(cases, args.backend, False, args.repeats)
    both = best_times(dict(cases, **({"peer": replace(case, rule=peer)} if peer else {})), args.backend, True,
                      args.repeats)
    print(f"\nrule {case.rule}")
    print(f"  {'T':>6} {'m':>4} {'fwd tok/s':>11} {'fwd+bwd tok/s':>14} {'fwd+bwd s':>10} {'peak MiB':>9}")
    for label, c in cases.items():
        memory = "-" if args.no_memory else f"{peak_memory(c, args.backend):.0f}"
        print(f"  {c.T:>6} {c.m:>4} {c.tokens / forward[label]:>11,.0f} {c.tokens / both[label]:>14,.0f} "
              f"{both[label]:>10.4f} {memory:>9}")

    ref_tokens = min(args.ref_tokens, case.T)
    reference = best_times({"ref": replace(case, T=ref_tokens)}, "reference", True, 1)["ref"] * case.T / ref_tokens
    scaled = "" if ref_tokens == case.T else f" (timed on {ref_tokens} tokens, scaled x{case.T / ref_tokens:g})"
    ratios = {
        "vs_reference": (reference / both["base"],
                         f"{args.backend} vs reference, fwd+bwd, T={case.T}: reference {reference:.2f} s{scaled}"),
        "long_over_base": (both["long"] / both["base"], f"time at T={args.long_T} / T={case.T}, fwd+bwd"),
        "many_over_few_slots": (both["many"] / both["base"],
                                f"time at m={args.many_slots} / m={case.m}, R={case.R}, T={case.T}, fwd+bwd"),
    }
    if peer:
        ratios["over_scalar_decay"] = (both["base"] / both["peer"],
                                       f"{case.rule} / {peer}, fwd+bwd, T={case.T}, m={case.m}")
    for name, (value, what) in ratios.items():
        print(f"  {what}: {value:.2f}   {verdict(name, value)}")


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if "--peers" in argv:
        from .peers import main as bench_peers
        return bench_peers(argv)
    if "--model" in argv:
        from .cost import main as bench_model
        return bench_model(argv)
    if _cuda_requested(argv):
        from .bench_cuda import main as bench_cuda
        return bench_cuda(argv)
    parser = argparse.ArgumentParser(prog="memplug bench", description=__doc__.split("\n\n")[0],
                                     epilog="Other programs, each with its own options (add --help): "
                                            "--peers (chunked against its CPU peers), --model (the Triton "
                                            "kernels' bytes and FLOPs against fla's, no GPU needed), --device "
                                            "cuda (the triton backend against fla on a GPU; --smoke for tiny shapes).")
    parser.add_argument("--backend", default="chunked", help=f"available here: {memplug.available_backends()}")
    parser.add_argument("--device", default="cpu", choices=["cpu"], help="cuda: see below")
    parser.add_argument("--rule", type=rule_list(), default="gated_deltanet,fm", help="comma-separated rules")
    parser.add_argument("--threads", type=positive_int, default=2, help="torch.set_num_threads (cpu)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64", "float16", "bfloat16"])
    for size, default, what in (("B", 1, None), ("H", 4, None), ("K", 64, None), ("V", 64, None),
                                ("T", 2048, "base sequence length"), ("long-T", 16384, None),
                                ("m", 8, "slots per head at the base shape"), ("many-slots", 64, None), ("R", 2, None),
                                ("ref-tokens", 128, "tokens to time the reference on"), ("repeats", 5, None)):
        parser.add_argument(f"--{size}", type=positive_int, default=default, help=what)
    parser.add_argument("--shared-routing", action="store_true", help="one routing for all heads (Hr = 1)")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurements")
    args = parser.parse_args(argv)
    if args.backend not in memplug.available_backends():
        parser.error(f"argument --backend: {args.backend!r} is not one of {memplug.available_backends()}")
    for slots in ("m", "many_slots"):
        if args.R > getattr(args, slots):
            option = "--" + slots.replace("_", "-")
            parser.error(f"argument --R: {args.R} routes per token exceed {option} {getattr(args, slots)} slots")

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    print(f"memplug bench: backend {args.backend} on {args.device}"
          + (f", {torch.get_num_threads()} threads" if device.type == "cpu"
             else f" ({torch.cuda.get_device_name(device)})"))
    print(f"shape: B={args.B} H={args.H} K={args.K} V={args.V}, {'shared' if args.shared_routing else 'per-head'} "
          f"routing, R={args.R}, coupling dt, {args.dtype}; base T={args.T}, m={args.m}")
    print(f"times: best of {args.repeats} rounds after a warm-up, shapes interleaved; peak memory: "
          + ("not measured" if args.no_memory else MEMORY_METHOD[device.type]))
    for rule in args.rule:
        case = Case(rule, T=args.T, m=args.m, R=args.R, B=args.B, H=args.H, K=args.K, V=args.V,
                    shared_routing=args.shared_routing, dtype=args.dtype, device=args.device)
        bench_rule(case, args)
    return 0


def _cuda_requested(argv) -> bool:
    """Whether the command line asks for `--device cuda` (or `cuda:N`)."""
    for i, a in enumerate(argv):
        if a.startswith("--device="):
            return a.split("=", 1)[1].startswith("cuda")
        if a == "--device" and i + 1 < len(argv):
            return argv[i + 1].startswith("cuda")
    return False


if __name__ == "__main__":
    sys.exit(main())
