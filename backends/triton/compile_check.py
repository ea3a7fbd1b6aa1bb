"""Compile the backend's kernels for a GPU without one: Triton's front end, its GPU passes, LLVM and
ptxas all run on the CPU, so every kernel can be built for an H100 (sm_90) here. This catches what
the interpreter cannot: type and shape errors of compiled Triton, `tl.dot` operand limits, and
configurations whose shared memory does not fit.

    python -m memplug.backends.triton.compile_check [--arch 90] [--full]

Default: every kernel, for each family it serves, in float32 and bfloat16 at K = V = 128 with the
default chunk size, under the first and the last autotuning configuration (a configuration whose shared memory does
not fit is skipped by the autotuner, so only a case where none fits fails). `--full` adds float16,
K = 64 and 256, chunk sizes 16 and 32, and every configuration. Must run without
`TRITON_INTERPRET` (interpreted kernels cannot be compiled); raises SystemExit listing failures.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from itertools import product

_DOT_DTYPE_ARGS = {"q", "k", "v", "w", "u", "hs", "dhs", "d", "d_out", "do"}
_POINTER_TYPES = {"chunk_indices": "*i32", "offsets": "*i64", "chunk_offsets": "*i64", "idx": "*i64"}
_SCALAR_TYPES = {"Hb": "i32", "H": "i32", "scale": "fp32", "s_b": "i64", "s_h": "i64", "s_m": "i64",
                 "s_k": "i64", "s_v": "i64"}
H100_SHARED_MEMORY = 227 * 1024  # bytes per block
_TRITON_DTYPES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}


def _signature(fn, dtype: str, constexprs: dict, none: set, overrides: dict):
    """Signature of JIT function `fn`: pointers to `dtype` for the dot-dtype arguments, float32 for
    other tensors, `none` arguments passed as None."""
    signature, constants = {}, {}
    for name, param in zip(fn.arg_names, fn.params):
        if param.is_constexpr:
            signature[name] = "constexpr"
            constants[name] = constexprs[name]
        elif name in none:
            signature[name] = "constexpr"
            constants[name] = None
        elif name in overrides:
            signature[name] = overrides[name]
        elif name in _SCALAR_TYPES:
            signature[name] = _SCALAR_TYPES[name]
        elif name in _POINTER_TYPES:
            signature[name] = _POINTER_TYPES[name]
        else:
            signature[name] = "*" + (_TRITON_DTYPES[dtype] if name in _DOT_DTYPE_ARGS else "fp32")
    return signature, constants


def _cases(full: bool, dtypes=None, Ks=None, BTs=None):
    """(kernel name, family, dtype, K, BT, constexprs, none-args, type overrides)."""
    from .common import DECAY_FLOOR, SPECIALIZATIONS, block
    from .vector import BC

    dtypes = dtypes or ["float32", "bfloat16"] + (["float16"] if full else [])
    Ks = Ks or [128] + ([64, 256] if full else [])
    BTs = BTs or [64] + ([16, 32] if full else [])
    for dtype, K, BT in product(dtypes, Ks, BTs):
        V, BK = K, block(K)
        for family, (decay, delta) in SPECIALIZATIONS.items():
            D = K if decay == 2 else 1
            base = dict(K=K, V=V, BT=BT, BK=BK, DECAY=decay)
            no_A = {"A"} if decay == 0 else set()
            not_vector = {"M"} if decay != 2 else set()
            if decay:
                for reverse in (False, True):
                    yield ("cumsum_kernel", family, dtype, K, BT,
                           dict(D=D, BD=1 << (D - 1).bit_length(), BT=BT, REVERSE=reverse, FLOOR=DECAY_FLOOR),
                           set(), {})
            for has_h0, store_ht in ((True, True), (False, False)):
                yield ("state_fwd_kernel", family, dtype, K, BT,
                       dict(base, DELTA=delta, HAS_H0=has_h0, STORE_HT=store_ht),
                       no_A | ({"w", "d_out"} if not delta else set()) | ({"h0"} if not has_h0 else set())
                       | ({"ht"} if not store_ht else set()), {})
            yield ("state_bwd_kernel", family, dtype, K, BT, dict(base, DELTA=delta, HAS_DHT=True, STORE_DH0=True),
                   no_A | ({"w"} if not delta else set()), {})
            yield ("output_fwd_kernel", family, dtype, K, BT, base, no_A | not_vector, {})
            yield ("dd_local_kernel", family, dtype, K, BT, base, no_A | not_vector, {})
            yield ("grad_kernel", family, dtype, K, BT, dict(base, DELTA=delta),
                   no_A | ({"dA"} if decay == 0 else set()) | ({"dM"} if decay != 2 else set())
                   | ({"dw", "dd"} if not delta else set()), {})
            if decay == 2:
                vec = dict(K=K, BT=BT, BK=BK, BC=BC)
                yield ("attention_fwd_kernel", family, dtype, K, BT, vec, set(), {})
                yield ("attention_bwd_kernel", family, dtype, K, BT, vec, set(), {})
            if delta:  # with a per-channel decay, L comes from the keys' attention (Lk) and goes back to it (dLk)
                for compute_T in (True, False):
                    yield ("wy_fwd_kernel", family, dtype, K, BT, dict(base, COMPUTE_T=compute_T),
                           no_A | ({"Lk"} if decay != 2 or not compute_T else set()), {})
                yield ("wy_bwd_kernel", family, dtype, K, BT, base,
                       no_A | ({"dA", "dA_in"} if decay == 0 else set()) | ({"Lk", "dLk"} if decay != 2 else set()), {})
            # the decode step: q in the input dtype; the coupled per-route inputs in float32
            yield ("step_kernel", family, dtype, K, BT, dict(R=2, K=K, V=V, BK=BK, DECAY=decay, DELTA=delta),
                   ({"a"} if decay == 0 else set()) | ({"b"} if not delta else set()),
                   {"k": "*fp32", "v": "*fp32", "idx": "*i64"})


def _kernel(name):
    from . import chunk, decode, delta, vector
    for module in (chunk, vector, delta, decode):
        if hasattr(module, name):
            return getattr(module, name)
    raise KeyError(name)


def compile_all(arch: int = 90, full: bool = False, verbose: bool = False, kernels=None, dtypes=None, Ks=None,
                BTs=None, families=None) -> list:
    """Compile every case (or those of `kernels`, `dtypes`, key widths `Ks`, chunk sizes `BTs`, and
    `families`: first words of the labels of `common.SPECIALIZATIONS`, such as "delta_vector");
    returns a list of (case, error) for those that fail."""
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise RuntimeError("compile_check: unset TRITON_INTERPRET (interpreted kernels cannot be compiled)")
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.runtime.autotuner import Heuristics

    target = GPUTarget("cuda", arch, 32)
    failures, count, start = [], 0, time.perf_counter()
    seen = set()
    for name, family, dtype, K, BT, constexprs, none, overrides in _cases(full, dtypes, Ks, BTs):
        if (kernels and name not in kernels) or (families and family.split(" ")[0].rstrip(",") not in families):
            continue
        tuned = _kernel(name)
        # Under `triton.heuristics`, the JIT function it wraps: the cases give the flags it would derive.
        jit = tuned.fn.fn if isinstance(tuned.fn, Heuristics) else tuned.fn
        configs = tuned.configs if full else [tuned.configs[0], tuned.configs[-1]]
        case = f"{name} [{family}, {dtype}, K={K}, BT={BT}, {constexprs}]"
        fits, too_big = 0, []
        for config in configs:
            cx = dict(constexprs, **config.kwargs)
            sig, constants = _signature(jit, dtype, cx, none, overrides)
            key = (name, dtype, tuple(sorted(sig.items())), tuple(sorted(map(str, constants.items()))),
                   config.num_warps, config.num_stages)
            if key in seen:
                fits += 1
                continue
            seen.add(key)
            what = f"{config.kwargs}, warps={config.num_warps}, stages={config.num_stages}"
            try:
                compiled = triton.compile(ASTSource(jit, sig, constants), target=target,
                                          options={"num_warps": config.num_warps, "num_stages": config.num_stages})
            except Exception as e:  # report every failure, not just the first
                failures.append((f"{case} {what}", f"{type(e).__name__}: {str(e)[:2000]}"))
                if verbose:
                    print(f"FAIL {case} {what}\n     {failures[-1][1]}", flush=True)
                continue
            count += 1
            shared = compiled.metadata.shared
            if shared > H100_SHARED_MEMORY:  # the autotuner skips such a configuration
                too_big.append(f"{what}: {shared} B")
            else:
                fits += 1
            if verbose:
                print(f"ok   {case} {what}  shared={shared}", flush=True)
        if not fits and too_big:
            failures.append((case, "no configuration fits an H100's shared memory: " + "; ".join(too_big)))
    if verbose:
        print(f"{count} compiled, {len(failures)} failed, {time.perf_counter() - start:.0f} s")
    return failures


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
    args = parser.parse_args(argv)
    split = lambda x, f=str: None if x is None else [f(v) for v in x.split(",")]
    failures = compile_all(args.arch, args.full, verbose=not args.quiet, kernels=split(args.kernels),
                           dtypes=split(args.dtypes), Ks=split(args.K, int), BTs=split(args.BT, int),
                           families=split(args.families))
    if failures:
        raise SystemExit("compile_check: failed to compile:\n" + "\n".join(f"  {w}\n    {e}" for w, e in failures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
