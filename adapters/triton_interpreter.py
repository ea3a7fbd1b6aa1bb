"""Run flash-linear-attention's Triton kernels on a CPU, through Triton's interpreter, so that a
user without a GPU can check a wrapped layer against fla's own (`docs/adapters.md`, "Verify on a
CPU"):

    from memplug.adapters import enable_triton_interpreter
    enable_triton_interpreter()   # first: before fla is imported

`TRITON_INTERPRET=1` makes `triton.jit` return interpreted functions, which run on CPU tensors. Four
things still stand in the way of fla's kernels there, and `enable_triton_interpreter` patches them:

1. autotuning: with more than one config, the autotuner benchmarks each one through the GPU driver,
   which does not exist. The patch keeps only the last config that survives pruning, so no
   benchmark runs (configs change speed, not results; fla lists its block sizes in increasing
   order, and the largest blocks mean the fewest interpreted programs).
2. loop indices: in compiled Triton, the index of `for i in range(n)` is a tensor, and kernels call
   `i.to(tl.int64)`; the interpreter runs the loop in Python, so `i` is an int without `.to`. The
   patch adds, at the top of every `for` loop body of a kernel, an assignment `i = i`, which the
   interpreter's own source rewriting turns into `i = to_tensor(i)` (an int32 scalar tensor, as
   compiled Triton has).
3. speed (no change of results): the interpreter re-patches the whole `triton.language` namespace
   on every call of a device function (`@triton.jit` helpers such as fla's `exp`), thousands of
   times per kernel. The patch skips that while a kernel launch has already patched it.
4. builtins under other names: the interpreter patches the builtins of `triton.language` where they
   live, not a module's own name for one (fla's `gather = tl.gather`, used by its KDA kernels), which
   then fails as a builtin called outside a compiler. The patch treats such names in the module of
   every kernel and device function it runs the same way, for the duration of the launch.

The patches reach into the interpreter's internals, so they are tied to the Triton releases they were
tested with (`SUPPORTED_TRITON`); any other release is refused with a clear error. `triton.jit`
decides at decoration time whether a kernel is interpreted, so the call must come before fla is
imported. The interpreter is slow: use small shapes (a few heads, tens of tokens).
"""
from __future__ import annotations

import ast
import importlib
import importlib.metadata
import inspect
import os
import sys
from typing import Optional

_ENABLED = False


def _is_range(call) -> bool:
    """`range(...)` or `tl.range(...)`; not `tl.static_range`, whose index stays a Python int."""
    if not isinstance(call, ast.Call):
        return False
    f = call.func
    return (isinstance(f, ast.Name) and f.id == "range") or (isinstance(f, ast.Attribute) and f.attr == "range")


class _LoopIndexAsTensor(ast.NodeTransformer):
    """Prepend `target = target` to each `for ... in range(...)` body whose target is a plain name."""

    def visit_For(self, node):
        self.generic_visit(node)
        if isinstance(node.target, ast.Name) and _is_range(node.iter):
            name = node.target.id
            assign = ast.Assign(targets=[ast.Name(id=name, ctx=ast.Store())], value=ast.Name(id=name, ctx=ast.Load()))
            node.body.insert(0, ast.copy_location(assign, node))
        return node


SUPPORTED_TRITON = ("3.9",)  # major.minor releases the patches were tested with
_INTERNALS = (("triton.runtime.autotuner", "Autotuner.prune_configs"),  # module, attribute the patches use
              ("triton.runtime.interpreter", "FunctionRewriter.ast_transformer"),
              ("triton.runtime.interpreter", "_patch_lang"), ("triton.runtime.interpreter", "_LangPatchScope"),
              ("triton.runtime.interpreter", "_patch_attr"), ("triton.runtime.interpreter", "interpreter_builder"))


def installed_triton() -> Optional[str]:
    """The installed Triton's version, read without importing it (None if absent)."""
    try:
        return importlib.metadata.version("triton")
    except importlib.metadata.PackageNotFoundError:
        return None


def _refuse(reason: str):
    raise RuntimeError(f"enable_triton_interpreter: {reason}")


def _check_can_enable() -> None:
    """Refuse, before changing anything, when the patches cannot work: no Triton, an untested
    release, or kernels already defined for a GPU. Triton itself must not be imported here:
    importing it defines `triton.language`'s own jitted helpers, interpreted or not for good."""
    version = installed_triton()
    if version is None:
        _refuse("Triton is not installed (pip install triton; it ships for Linux only)")
    if ".".join(version.split(".")[:2]) not in SUPPORTED_TRITON:
        _refuse(f"Triton {version} is installed, but the interpreter patches are tested with Triton "
                f"{', '.join(SUPPORTED_TRITON)} only; install a supported release "
                f"(e.g. pip install 'triton=={SUPPORTED_TRITON[-1]}.*')")
    if any(name == "fla" or name.startswith("fla.") for name in sys.modules):
        _refuse("fla is already imported, so its kernels were defined for a GPU; call "
                "enable_triton_interpreter() first, before anything imports fla (in a fresh process)")
    if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
        _refuse("Triton is already imported without its interpreter; call enable_triton_interpreter() first, "
                "before anything imports triton or fla (in a fresh process)")


def _check_internals() -> None:
    """The interpreter internals the patches replace exist in this Triton."""
    for module, attribute in _INTERNALS:
        obj = importlib.import_module(module)
        for part in attribute.split("."):
            obj = getattr(obj, part, None)
            if obj is None:
                _refuse(f"this Triton ({installed_triton()}) has no {module}.{attribute}, which the patches need")


def enable_triton_interpreter() -> None:
    """Turn Triton's interpreter on and apply the four patches (idempotent). Raises RuntimeError,
    changing nothing, when the installed Triton is not a supported release or triton or fla were
    imported before."""
    global _ENABLED
    if _ENABLED:
        return
    _check_can_enable()
    previous = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        _check_internals()
    except RuntimeError:
        if previous is None:
            os.environ.pop("TRITON_INTERPRET")
        raise
    from triton.runtime import autotuner, interpreter

    prune = autotuner.Autotuner.prune_configs

    def last_config_only(self, kwargs):
        return prune(self, kwargs)[-1:]

    autotuner.Autotuner.prune_configs = last_config_only

    base = interpreter.FunctionRewriter.ast_transformer

    class Transformer(type(base)):
        def visit_FunctionDef(self, node):
            node = _LoopIndexAsTensor().visit(node)
            self.generic_visit(node)
            return node

    interpreter.FunctionRewriter.ast_transformer = Transformer()

    patch_lang = interpreter._patch_lang
    launch = {"scope": None, "langs": set(), "aliased": set()}  # the launch under way, what it patched

    import triton.language as tl

    modules_of = {}  # id of a function's globals -> ids of the language modules among them

    def lang_modules(fn):
        key = id(fn.__globals__)
        if key not in modules_of:
            modules_of[key] = {id(v) for v in fn.__globals__.values() if inspect.ismodule(v) and v in (tl, tl.core)}
        return modules_of[key]

    class LaunchScope:
        def restore(self):
            try:
                launch["scope"].restore()
            finally:
                launch["scope"], launch["langs"], launch["aliased"] = None, set(), set()

    def patch_aliases(fn):
        """Module-level names of `fn`'s module bound to builtins, patched like the builtins themselves."""
        module = sys.modules.get(getattr(fn, "__module__", None))
        if module is None or id(module) in launch["aliased"]:
            return
        launch["aliased"].add(id(module))
        for name, value in list(vars(module).items()):
            if inspect.isfunction(value) and tl.core.is_builtin(value):
                interpreter._patch_attr(module, name, value, interpreter.interpreter_builder, launch["scope"])

    def patch_lang_once(fn):
        langs = lang_modules(fn)
        if launch["scope"] is None:  # a kernel launch: patch, and restore when it ends
            launch["scope"], launch["langs"] = patch_lang(fn), set(langs)
            patch_aliases(fn)
            return LaunchScope()
        if not langs <= launch["langs"]:  # a device function seeing modules the launch did not patch
            launch["scope"]._changes.extend(patch_lang(fn)._changes)  # undone when the launch ends
            launch["langs"] |= langs
        patch_aliases(fn)
        return interpreter._LangPatchScope()

    interpreter._patch_lang = patch_lang_once
    _ENABLED = True


def interpreter_self_test() -> dict:
    """Check the first two patches on a kernel of our own: autotuned over two configs, whose loop index calls
    `.to()`. Only the last config (BLOCK = 4, the width of the input) gives the right result, and
    benchmarking would need a GPU driver. Returns the maximum error against PyTorch (0 expected) and
    the config the autotuner kept."""
    if not _ENABLED:
        raise RuntimeError("interpreter_self_test: call enable_triton_interpreter() first")
    import torch
    import triton
    import triton.language as tl

    @triton.autotune(configs=[triton.Config({"BLOCK": 8}), triton.Config({"BLOCK": 4})], key=["n"])
    @triton.jit
    def running_sum(x, y, n, BLOCK: tl.constexpr):
        cols = tl.arange(0, BLOCK)
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        for i in range(n):
            row = i.to(tl.int64)  # an AttributeError without the loop-index patch
            acc += tl.load(x + row * BLOCK + cols)
            tl.store(y + row * BLOCK + cols, acc)

    x = torch.randn(5, 4)
    y = torch.empty_like(x)
    running_sum[(1,)](x, y, x.shape[0])
    return {"max_error": float((y - x.cumsum(0)).abs().max()), "block": running_sum.best_config.kwargs["BLOCK"]}
