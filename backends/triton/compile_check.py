"""Compile the backend's kernels for a GPU without one: Triton's front end, its GPU passes, LLVM and
ptxas all run on the CPU, so every kernel can be built for an H100 (sm_90) here. This catches what
the interpreter cannot: type and shape errors of compiled Triton, `tl.dot` operand limits, and
configurations whose shared memory does not fit; and it reports what ptxas makes of each kernel.

    python -m memplug.backends.triton.compile_check [--arch 90] [--full] [--table FILE.md]

Default: every kernel, for each family it serves, in float32 and bfloat16 at K = V = 128 with the
default chunk size, under the first and the last of the autotuning configurations that can run
(`common.Tuned.candidates`: the first chosen for the dtype, those the launch's K rules out pruned;
a configuration whose shared memory does not fit is skipped by the autotuner, so only a case where
none fits fails). `--full` adds float16, K = 64 and 256, chunk sizes 16 and 32, and every
configuration. Must run without
`TRITON_INTERPRET` (interpreted kernels cannot be compiled); raises SystemExit listing failures.

Each kernel is compiled as a real launch specializes it (`LAUNCH_INTS`): tensors 16-byte aligned and
integer arguments divisible by 16 marked so (`tt.divisibility`), integers equal to 1 made constants;
without that, registers, spills and shared memory differ from what a launch gets. For each
configuration ptxas reports registers and spill bytes per thread; with the shared memory this gives
the resident warps per SM (`occupancy`). `--table` writes them as a markdown table, with the goals:
the first configuration of every kernel (what runs with autotuning off) fitting in shared memory and
spill-free at K = V <= 128,
a spill-free configuration of every kernel at K = V = 128, and none of those that can run spilling at
K = 256.
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from itertools import product

import torch

_DOT_DTYPE_ARGS = {"q", "k", "v", "w", "u", "hs", "dhs", "d", "d_out", "do"}
_POINTER_TYPES = {"chunk_indices": "*i32", "offsets": "*i64", "chunk_offsets": "*i64", "idx": "*i64",
                  "positions": "*i64"}
_SCALAR_TYPES = {"Hb": "i32", "SLOTS": "i32", "H": "i32", "scale": "fp32", "s_b": "i64", "s_h": "i64", "s_m": "i64",
                 "s_k": "i64", "s_v": "i64"}
H100_SHARED_MEMORY = 227 * 1024  # bytes per block
# The values integer arguments have at a launch (H = 16 heads, m = 8 slots, a contiguous [B, H, m, K, V]
# state): a real launch marks those divisible by 16 so and turns those equal to 1 into constants.
LAUNCH_INTS = {"Hb": 16, "SLOTS": 8, "H": 16, "s_b": 16 * 8 * 128 * 128, "s_h": 8 * 128 * 128, "s_m": 128 * 128,
               "s_k": 128, "s_v": 1}
# Per SM on an H100 (sm_90): registers, shared memory (228 KB, 1 KB of it reserved per block), warps and blocks.
SM_REGISTERS, SM_SHARED_MEMORY, SM_WARPS, SM_BLOCKS = 65536, 228 * 1024, 64, 32
_TRITON_DTYPES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}


def _signature(fn, dtype: str, constexprs: dict, none: set, overrides: dict):
    """Signature, constants and attributes of JIT function `fn` as a real launch specializes it:
    pointers to `dtype` for the dot-dtype arguments, float32 for other tensors, `none` arguments
    passed as None; pointers 16-byte aligned, integers as in `LAUNCH_INTS`."""
    signature, constants, attrs = {}, {}, {}
    for i, (name, param) in enumerate(zip(fn.arg_names, fn.params)):
        if param.is_constexpr:
            signature[name] = "constexpr"
            constants[name] = constexprs[name]
        elif name in none:
            signature[name] = "constexpr"
            constants[name] = None
        elif name in _SCALAR_TYPES and LAUNCH_INTS.get(name) == 1:
            signature[name] = "constexpr"
            constants[name] = 1
        else:
            if name in overrides:
                signature[name] = overrides[name]
            elif name in _SCALAR_TYPES:
                signature[name] = _SCALAR_TYPES[name]
            elif name in _POINTER_TYPES:
                signature[name] = _POINTER_TYPES[name]
            else:
                signature[name] = "*" + (_TRITON_DTYPES[dtype] if name in _DOT_DTYPE_ARGS else "fp32")
            if signature[name].startswith("*") or LAUNCH_INTS.get(name, 1) % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
    return signature, constants, attrs


@dataclass(frozen=True)
class Report:
    """What ptxas reports for one compiled configuration, with its shared memory and occupancy."""

    registers: int
    spill_stores: int
    spill_loads: int
    shared: int  # bytes per block
    num_warps: int

    @property
    def spills(self) -> bool:
        return self.spill_stores > 0 or self.spill_loads > 0

    @property
    def fits(self) -> bool:
        """Whether its shared memory fits an H100's block (the autotuner skips a configuration that does not)."""
        return self.shared <= H100_SHARED_MEMORY

    @property
    def warps_per_sm(self) -> int:
        """Resident warps per SM: the fewest blocks that registers (allocated per warp in units of
        256), shared memory and the block limit allow, times the block's warps."""
        per_warp = -(-self.registers * 32 // 256) * 256
        blocks = min(SM_BLOCKS, SM_REGISTERS // (per_warp * self.num_warps), SM_WARPS // self.num_warps,
                     SM_SHARED_MEMORY // (self.shared + 1024))
        return blocks * self.num_warps


def ptxas_report(compiled, arch: int, num_warps: int) -> Report:
    """Run ptxas -v (as Triton runs it) on the PTX of `compiled` and read its register and spill counts."""
    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability

    with tempfile.TemporaryDirectory() as tmp:
        ptx = os.path.join(tmp, "kernel.ptx")
        with open(ptx, "w") as f:
            f.write(compiled.asm["ptx"])
        log = subprocess.run([get_ptxas(arch).path, "-lineinfo", "-v", "--regAllocOptLevel=2",
                              f"--gpu-name={sm_arch_from_capability(arch)}", ptx, "-o", os.path.join(tmp, "k.o")],
                             capture_output=True, text=True, check=True).stderr
    number = lambda pattern: int(re.search(pattern, log).group(1))
    return Report(number(r"Used (\d+) registers"), number(r"(\d+) bytes spill stores"),
                  number(r"(\d+) bytes spill loads"), compiled.metadata.shared, num_warps)


def _cases(full: bool, dtypes=None, Ks=None, BTs=None):
    """(kernel name, family, dtype, K, BT, constexprs, none-args, type overrides)."""
    from .chunk import channel_block
    from .combine import feature_block
    from .common import DECAY_FLOOR, SPECIALIZATIONS, block, key_block, row_sub_block
    from .delta import wy_key_block
    from .vector import BC

    dtypes = dtypes or ["float32", "bfloat16"] + (["float16"] if full else [])
    Ks = Ks or [128] + ([64, 256] if full else [])
    BTs = BTs or [64] + ([16, 32] if full else [])
    for dtype, K, BT in product(dtypes, Ks, BTs):
        V, BK = K, block(K)
        BKW, BS = key_block(BK, getattr(torch, dtype)), row_sub_block(BT, BK, getattr(torch, dtype))
        for family, (decay, delta) in SPECIALIZATIONS.items():
            D = K if decay == 2 else 1
            base = dict(K=K, V=V, BT=BT, BK=BK, DECAY=decay)
            keyed = dict(K=K, V=V, BT=BT, BKW=BKW, DECAY=decay)  # kernels that take keys in blocks
            no_A = {"A"} if decay == 0 else set()
            not_vector = {"M"} if decay != 2 else set()
            if decay:
                for reverse in (False, True):
                    yield ("cumsum_kernel", family, dtype, K, BT,
                           dict(D=D, BD=channel_block(D), BT=BT, REVERSE=reverse, FLOOR=DECAY_FLOOR),
                           set(), {})
            for has_h0, store_ht in ((True, True), (False, False)):
                yield ("state_fwd_kernel", family, dtype, K, BT,
                       dict(base, BS=BS, DELTA=delta, HAS_H0=has_h0, STORE_HT=store_ht),
                       no_A | ({"w", "d_out"} if not delta else set()) | ({"h0"} if not has_h0 else set())
                       | ({"ht"} if not store_ht else set()), {})
            for has_read_w in (False, True):
                yield ("state_bwd_kernel", family, dtype, K, BT,
                       dict(base, BS=BS, DELTA=delta, HAS_DHT=True, STORE_DH0=True, HAS_READ_W=has_read_w),
                       no_A | ({"w"} if not delta else set()) | ({"read_w"} if not has_read_w else set()), {})
            for has_read_w in (False, True):
                yield ("output_fwd_kernel", family, dtype, K, BT, dict(keyed, HAS_READ_W=has_read_w),
                       no_A | not_vector | ({"read_w"} if not has_read_w else set()), {})
                yield ("dd_local_kernel", family, dtype, K, BT, dict(keyed, HAS_READ_W=has_read_w),
                       no_A | not_vector | ({"read_w"} if not has_read_w else set()), {})
            for has_read_w in (False, True):
                yield ("grad_kernel", family, dtype, K, BT, dict(keyed, DELTA=delta, HAS_READ_W=has_read_w),
                       no_A | ({"dA"} if decay == 0 else set()) | ({"dM"} if decay != 2 else set())
                       | ({"dw", "dd"} if not delta else set()) | ({"read_w"} if not has_read_w else set()), {})
            if decay == 2:
                vec = dict(K=K, BT=BT, BK=BK, BC=BC)
                yield ("attention_fwd_kernel", family, dtype, K, BT, dict(vec, BKW=BKW), set(), {})
                yield ("attention_bwd_kernel", family, dtype, K, BT, vec, set(), {})
            if delta:  # with a per-channel decay, L comes from the keys' attention (Lk) and goes back to it (dLk)
                wy = dict(base, BKW=wy_key_block(BK, getattr(torch, dtype)))
                for compute_T in (True, False):
                    yield ("wy_fwd_kernel", family, dtype, K, BT, dict(wy, COMPUTE_T=compute_T),
                           no_A | ({"Lk"} if decay != 2 or not compute_T else set()), {})
                yield ("wy_bwd_kernel", family, dtype, K, BT, wy,
                       no_A | ({"dA", "dA_in"} if decay == 0 else set()) | ({"Lk", "dLk"} if decay != 2 else set()), {})
            # the decode step: q in the input dtype; the coupled per-route inputs in float32
            yield ("step_kernel", family, dtype, K, BT, dict(R=2, K=K, V=V, BK=BK, DECAY=decay, DELTA=delta),
                   ({"a"} if decay == 0 else set()) | ({"b"} if not delta else set()),
                   {"k": "*fp32", "v": "*fp32", "idx": "*i64"})
        # the combine of a routed scan (any family), R = 2: rows of one head (per-head routing) and of
        # 16 heads (one routing for all); its output and the route outputs' gradient in the input dtype
        if BT == BTs[0]:
            in_dtype = "*" + _TRITON_DTYPES[dtype]
            for F in (V, 16 * V):
                rows = dict(F=F, R=2, BF=feature_block(F))
                yield "combine_fwd_kernel", "routed (every family)", dtype, K, BT, rows, set(), {"o": in_dtype}
                for weight_grad in (True, False):
                    yield ("combine_bwd_kernel", "routed (every family)", dtype, K, BT,
                           dict(rows, WEIGHT_GRAD=weight_grad), set() if weight_grad else {"dread_w"},
                           {"dout": in_dtype})


def _kernel(name):
    from . import chunk, combine, decode, delta, vector
    for module in (chunk, vector, delta, decode, combine):
        if hasattr(module, name):
            return getattr(module, name)
    raise KeyError(name)


_VARIANT_FLAGS = ("REVERSE", "HAS_H0", "STORE_HT", "COMPUTE_T", "HAS_READ_W", "F", "WEIGHT_GRAD")


@dataclass
class Case:
    """One kernel specialization and what each of its configurations compiled to (None: failed)."""

    kernel: str
    family: str
    dtype: str
    K: int
    BT: int
    variant: str
    reports: dict  # configuration label -> Report or None, in the autotuning list's order


def compile_all(arch: int = 90, full: bool = False, verbose: bool = False, kernels=None, dtypes=None, Ks=None,
                BTs=None, families=None) -> tuple:
    """Compile every case (or those of `kernels`, `dtypes`, key widths `Ks`, chunk sizes `BTs`, and
    `families`: first words of the labels of `common.SPECIALIZATIONS`, such as "delta_vector");
    returns (a list of (case, error) for those that fail, the `Case`s with their ptxas reports)."""
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise RuntimeError("compile_check: unset TRITON_INTERPRET (interpreted kernels cannot be compiled)")
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.runtime.autotuner import Heuristics

    target = GPUTarget("cuda", arch, 32)
    failures, cases, count, start = [], [], 0, time.perf_counter()
    seen = {}
    for name, family, dtype, K, BT, constexprs, none, overrides in _cases(full, dtypes, Ks, BTs):
        if (kernels and name not in kernels) or (families and family.split(" ")[0].rstrip(",") not in families):
            continue
        tuned = _kernel(name)
        # Under `triton.heuristics`, the JIT function it wraps: the cases give the flags it would derive.
        jit = tuned.fn.fn if isinstance(tuned.fn, Heuristics) else tuned.fn
        candidates = tuned.candidates(getattr(torch, dtype), constexprs)
        configs = candidates if full else candidates[:1] + candidates[1:][-1:]
        label = f"{name} [{family}, {dtype}, K={K}, BT={BT}, {constexprs}]"
        variant = ",".join(f"{f}={int(constexprs[f])}" for f in _VARIANT_FLAGS if f in constexprs)
        case = Case(name, family, dtype, K, BT, variant, {})
        cases.append(case)
        fits, too_big = 0, []
        for config in configs:
            what = f"{config.kwargs}, warps={config.num_warps}, stages={config.num_stages}"
            cx = dict(constexprs, **config.kwargs)
            sig, constants, attrs = _signature(jit, dtype, cx, none, overrides)
            key = (name, dtype, tuple(sorted(sig.items())), tuple(sorted(map(str, constants.items()))),
                   config.num_warps, config.num_stages)
            if key not in seen:
                try:
                    compiled = triton.compile(ASTSource(jit, sig, constants, attrs), target=target,
                                              options={"num_warps": config.num_warps, "num_stages": config.num_stages})
                    seen[key] = ptxas_report(compiled, arch, config.num_warps)
                    count += 1
                except Exception as e:  # report every failure, not just the first
                    seen[key] = None
                    failures.append((f"{label} {what}", f"{type(e).__name__}: {str(e)[:2000]}"))
                    if verbose:
                        print(f"FAIL {label} {what}\n     {failures[-1][1]}", flush=True)
            report = case.reports[_config_label(config)] = seen[key]
            if report is None:
                continue
            if not report.fits:
                too_big.append(f"{what}: {report.shared} B")
            else:
                fits += 1
            if verbose:
                print(f"ok   {label} {what}  registers={report.registers} spills={report.spill_stores}/"
                      f"{report.spill_loads} shared={report.shared}", flush=True)
        if not fits and too_big:
            failures.append((label, "no configuration fits an H100's shared memory: " + "; ".join(too_big)))
    if verbose:
        print(f"{count} compiled, {len(failures)} failed, {time.perf_counter() - start:.0f} s")
    return failures, cases


def _config_label(config) -> str:
    block = "".join(f"{k}{v}" for k, v in config.kwargs.items())
    return f"{block} w{config.num_warps} s{config.num_stages}".strip()


def goals(cases: list) -> list:
    """(goal, cases that miss it, how many cases it applies to) for the three spill goals of the
    module's docstring."""
    fitting = lambda case: {c: r for c, r in case.reports.items() if r is not None and r.fits}
    first = lambda case: next(iter(case.reports.values()))
    name = lambda case: f"{case.kernel} [{case.family}, {case.dtype}, K={case.K}, BT={case.BT}, {case.variant}]"
    # The first configuration is what runs with autotuning off: it must also fit in shared memory.
    bad_first = lambda c: first(c) is None or first(c).spills or not first(c).fits
    return [
        ("the first configuration fits and is spill-free (K = V <= 128)",
         [name(c) for c in cases if c.K <= 128 and bad_first(c)], sum(c.K <= 128 for c in cases)),
        ("a spill-free configuration exists (K = V = 128)",
         [name(c) for c in cases if c.K == 128 and not any(not r.spills for r in fitting(c).values())],
         sum(c.K == 128 for c in cases)),
        ("no configuration that can run spills (K = 256)",
         [name(c) for c in cases if c.K == 256 and any(r.spills for r in fitting(c).values())],
         sum(c.K == 256 for c in cases)),
    ]


def verdict(missed: list, applies: int) -> str:
    if not applies:
        return "not checked (no case of it compiled)"
    if not missed:
        return f"PASS ({applies} cases)"
    return f"MISS ({len(missed)} of {applies}: {'; '.join(missed)})"


def table(cases: list) -> str:
    """A markdown table: per case, the first configuration and the best (no spills, then most
    resident warps), registers, spill bytes stored/loaded per thread, shared memory and warps per SM."""
    def cells(label, r):
        if r is None:
            return f"{label} | failed | | | "
        fit = "" if r.fits else " (does not fit)"
        spill = f"{r.spill_stores}/{r.spill_loads}"
        return f"{label} | {r.registers} | {spill} | {r.shared / 1024:.0f}{fit} | {r.warps_per_sm}"

    lines = ["| kernel | family | dtype | K | BT | variant | configs (spilling) | first config | regs | spill B | "
             "smem KB | warps/SM | best config | regs | spill B | smem KB | warps/SM |",
             "|" + "---|" * 17]
    for c in cases:
        done = {label: r for label, r in c.reports.items() if r is not None and r.fits}
        spilling = sum(r.spills for r in done.values())
        first_label, first = next(iter(c.reports.items()))
        best = min(done.items(), key=lambda item: (item[1].spills, -item[1].warps_per_sm), default=(None, None))
        lines.append(f"| {c.kernel} | {c.family} | {c.dtype} | {c.K} | {c.BT} | {c.variant} | "
                     f"{len(c.reports)} ({spilling}) | {cells(first_label, first)} | {cells(*best)} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m memplug.backends.triton.compile_check", description=__doc__)
    parser.add_argument("--arch", type=int, default=90, help="CUDA compute capability x10 (90: H100)")
    parser.add_argument("--full", action="store_true")
    parser.add_argument("--quiet", action="store_true")
    parser.add_argument("--kernels", help="comma-separated kernel names (default: all)")
    parser.add_argument("--dtypes", help="comma-separated, e.g. bfloat16,float16")
    parser.add_argument("--K", help="comma-separated key widths")
    parser.add_argument("--BT", help="comma-separated chunk sizes")
    parser.add_argument("--families", help="comma-separated families, e.g. delta_vector (default: all)")
    parser.add_argument("--table", help="write the registers, spills, shared memory and occupancy table here (.md)")
    args = parser.parse_args(argv)
    split = lambda x, f=str: None if x is None else [f(v) for v in x.split(",")]
    failures, cases = compile_all(args.arch, args.full, verbose=not args.quiet, kernels=split(args.kernels),
                                  dtypes=split(args.dtypes), Ks=split(args.K, int), BTs=split(args.BT, int),
                                  families=split(args.families))
    summary = [f"- {goal}: {verdict(missed, applies)}" for goal, missed, applies in goals(cases)]
    if not args.quiet:
        print("\n".join(summary))
    if args.table:
        with open(args.table, "w") as f:
            f.write(f"Goals (sm_{args.arch}, launch specialization as `LAUNCH_INTS`):\n\n" + "\n".join(summary)
                    + "\n\n" + table(cases) + "\n")
    if failures:
        raise SystemExit("compile_check: failed to compile:\n" + "\n".join(f"  {w}\n    {e}" for w, e in failures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
