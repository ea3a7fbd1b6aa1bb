"""Adapters (memplug.adapters): fla layers and models wrapped with routed sparse memory.

Reproduction is checked against fla itself: `tests/support/fla_reference.py` runs fla's layers with
their Triton kernels under Triton's interpreter on the CPU, in a separate process started at the
first test of this module (the interpreter must be on before fla is imported, and this process runs
the adapters without it). The tests that need its results come last, so the two overlap.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from memplug.adapters import (MemoryConfig, RoutedAdapter, SlotConv, SlotLinear, aux_loss, load_pretrained,
                              supported_layers, wrap, wrap_model)

sys.path.insert(0, str(Path(__file__).parent))
from support.fla_cases import (B, CASES, D, DECODE_ONLY, MODELS, PREFILL, T, build, build_model,  # noqa: E402
                               inputs, token_ids)

pytest.importorskip("fla")
from fla.models.utils import Cache  # noqa: E402

warnings.filterwarnings("ignore", message=".*(ShortConvolution|fast path|Triton|causal_conv1d).*")

ROOT = Path(__file__).resolve().parents[1]
FIRST_CASE = {}  # layer type -> its first case in CASES
for _name, (_cls, _, _) in CASES.items():
    FIRST_CASE.setdefault(_cls.rsplit(".", 1)[-1], _name)
LAYER_TYPES = sorted(FIRST_CASE)


# --------------------------------------------------------------------------------------------------
# The reference process


@pytest.fixture(scope="module", autouse=True)
def _reference_process(request, tmp_path_factory):
    """Start the reference script at the first test of this module, if a selected test needs it;
    `reference` waits for it."""
    if not any("reference" in getattr(item, "fixturenames", ()) for item in request.session.items
               if getattr(item, "module", None) is request.module):
        yield None
        return
    path = tmp_path_factory.mktemp("fla_reference") / "reference.pt"
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    process = subprocess.Popen([sys.executable, str(ROOT / "tests" / "support" / "fla_reference.py"), str(path)],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    yield process, path
    if process.poll() is None:
        process.kill()
        process.wait()


@pytest.fixture(scope="module")
def reference(_reference_process):
    process, path = _reference_process
    output, _ = process.communicate(timeout=900)
    if process.returncode != 0:
        pytest.fail("tests/support/fla_reference.py failed:\n" + output.decode(errors="replace")[-4000:])
    return torch.load(path)


# --------------------------------------------------------------------------------------------------
# Helpers


def _decode(layer, x, mask=None, prefill=PREFILL):
    """Prefill (if any), then one token per call, through fla's Cache; returns outputs and the cache entry."""
    cache = Cache()
    outputs = []
    if prefill:
        outputs.append(layer(x[:, :prefill], attention_mask=None if mask is None else mask[:, :prefill],
                             past_key_values=cache, use_cache=True)[0])
    for t in range(prefill, x.shape[1]):
        outputs.append(layer(x[:, t:t + 1], attention_mask=None if mask is None else mask[:, :t + 1],
                             past_key_values=cache, use_cache=True)[0])
    return torch.cat(outputs, 1), cache[0]


def _routed_configs(layer_type):
    configs = [dict(num_slots=4, topk=2)]
    if layer_type == "Mamba2":
        configs.append(dict(num_slots=3, topk=2, coupling="none", shared_slot=True,
                            router={"per_head": True, "load_balance_coef": 0.01}))
    else:
        configs.append(dict(num_slots=3, topk=2, coupling="none", per_slot_kv=True, shared_slot=True,
                            router={"per_head": True, "load_balance_coef": 0.01}))
    return configs


ROUTED = [(t, c) for t in LAYER_TYPES for c in _routed_configs(t)]
ROUTED_IDS = [f"{t}-{'shared_writes' if i == 0 else 'slot_options'}"
              for t in LAYER_TYPES for i, _ in enumerate(_routed_configs(t))]


def _close(a, b, atol=2e-5, rtol=1e-4):
    torch.testing.assert_close(a, b, atol=atol, rtol=rtol)


# --------------------------------------------------------------------------------------------------
# Wrapping, registry and errors


def test_supported_layers_and_unknown_layer_error():
    names = supported_layers()
    for layer in ("GatedLinearAttention", "SimpleGatedLinearAttention", "DeltaNet", "GatedDeltaNet",
                  "KimiDeltaAttention", "Mamba2"):
        assert any(n.endswith("." + layer) for n in names)
    with pytest.raises(TypeError, match="no adapter for layers of type torch.nn.modules.linear.Linear") as error:
        wrap(nn.Linear(4, 4), num_slots=2, topk=1)
    assert "fla.layers.gla.GatedLinearAttention" in str(error.value) and "register_adapter" in str(error.value)


@pytest.mark.parametrize("layer_type", LAYER_TYPES)
def test_wrap_keeps_the_layers_parameters(layer_type):
    layer = build(FIRST_CASE[layer_type])
    routed = wrap(layer, num_slots=4, topk=2)
    assert isinstance(routed, RoutedAdapter) and routed.layer_idx == layer.layer_idx
    for name, param in layer.named_parameters():
        assert routed.get_parameter(name) is param  # shared, same names
    extra = set(dict(routed.named_parameters())) - set(dict(layer.named_parameters()))
    assert extra == {"router.proj.weight"}
    with pytest.raises(TypeError, match="already wrapped"):
        wrap(routed, num_slots=2, topk=1)


def test_per_slot_copies_start_as_copies():
    layer = build("gla")
    routed = wrap(layer, num_slots=3, topk=2, per_slot_kv=True)
    assert not hasattr(routed, "k_proj")  # replaced by its per-slot copies (no shared slot)
    k = routed.slots["k_proj"]
    assert isinstance(k, SlotLinear) and k.weight.shape == (3, *layer.k_proj.weight.shape)
    assert all(torch.equal(w, layer.k_proj.weight) for w in k.weight)
    conv = routed.slots["k_conv1d"]
    assert isinstance(conv, SlotConv)
    assert torch.equal(conv.weight.reshape(3, *layer.k_conv1d.weight.shape)[2], layer.k_conv1d.weight)
    gate = routed.slots["gk_proj"]
    assert gate[0].shared_input and not gate[1].shared_input
    assert torch.equal(gate[1].bias[1], layer.gk_proj[1].bias)
    with_shared = wrap(build("gla"), num_slots=3, topk=2, per_slot_kv=True, shared_slot=True)
    assert isinstance(with_shared.k_proj, nn.Linear)  # the shared slot keeps the original


@pytest.mark.parametrize("layer_type", LAYER_TYPES)
def test_dense_copies_reproduce_the_layer_at_initialisation(layer_type):
    """Every slot starts from the layer's state and (with per_slot_kv) the layer's projections: with
    dense routing and coupling "none" all slots see every token alike, and the read weights sum to 1,
    so the extended layer computes the original one."""
    per_slot = layer_type != "Mamba2"
    layer = build(FIRST_CASE[layer_type])
    one = wrap(layer, num_slots=1, topk=1)
    many = wrap(layer, num_slots=3, topk=3, coupling="none", per_slot_kv=per_slot, router={"kind": "dense"})
    x, _ = inputs()
    with torch.no_grad():
        _close(many(x)[0], one(x)[0])


def test_rejected_options():
    from fla.layers import DeltaNet, GatedDeltaNet, KimiDeltaAttention

    with pytest.raises(ValueError, match="allow_neg_eigval"):
        wrap(DeltaNet(hidden_size=D, num_heads=2, allow_neg_eigval=True), num_slots=2, topk=1)
    with pytest.raises(ValueError, match="allow_neg_eigval"):
        wrap(GatedDeltaNet(hidden_size=D, num_heads=2, head_dim=8, allow_neg_eigval=True), num_slots=2, topk=1)
    with pytest.raises(ValueError, match="KimiDeltaAttention with allow_neg_eigval"):
        wrap(KimiDeltaAttention(hidden_size=D, num_heads=2, head_dim=8, allow_neg_eigval=True), num_slots=2, topk=1)
    with pytest.raises(ValueError, match="per_slot_kv"):
        wrap(build("mamba2"), num_slots=2, topk=1, per_slot_kv=True)
    with pytest.raises(ValueError, match="topk"):
        wrap(build("gla"), num_slots=2, topk=3)
    with pytest.raises(ValueError, match="coupling"):
        wrap(build("gla"), num_slots=2, topk=1, coupling="bogus")
    with pytest.raises(ValueError, match="^router.capacity_factor: not supported by the adapters"):
        wrap(build("gla"), num_slots=2, topk=1, router={"capacity_factor": 1.0})
    with pytest.raises(TypeError, match="unknown options"):
        MemoryConfig.make(num_slots=2, topk=1, slots=3)
    with pytest.raises(ValueError, match="^cu_seqlens: expected strictly increasing offsets from 0 to T = 5"):
        wrap(build("gla"), num_slots=2, topk=1)(torch.randn(1, 5, D),
                                                cu_seqlens=torch.tensor([0, 2, 4], dtype=torch.int32))
    with pytest.raises(ValueError, match="backend: unknown backend 'no_such_backend'"):
        wrap(build("gla"), num_slots=2, topk=1, backend="no_such_backend")
    with pytest.raises(TypeError, match="shared_slot: expected a bool"):
        wrap(build("gla"), num_slots=2, topk=1, shared_slot="yes")
    with pytest.raises(ValueError, match="attention_mask"):
        wrap(build("gla"), num_slots=2, topk=1)(torch.randn(2, 3, D), attention_mask=torch.ones(2, 3, 3))


# --------------------------------------------------------------------------------------------------
# Routed memory: training, decoding, padding, packing


@pytest.mark.parametrize("layer_type,config", ROUTED, ids=ROUTED_IDS)
def test_routed_forward_backward(layer_type, config):
    layer = build(FIRST_CASE[layer_type]).train()
    routed = wrap(layer, **config)
    x, _ = inputs()
    y, attentions, cache = routed(x)
    assert y.shape == x.shape and attentions is None and cache is None and torch.isfinite(y).all()
    loss = y.square().mean()
    balance = aux_loss(routed)
    if config.get("router", {}).get("load_balance_coef"):
        assert balance is not None and balance > 0
        loss = loss + balance
    else:
        assert balance is None
    loss.backward()
    assert routed.router.proj.weight.grad.abs().sum() > 0
    out = routed.o_proj if hasattr(routed, "o_proj") else routed.out_proj
    assert out.weight.grad.abs().sum() > 0
    for name, param in routed.slots.named_parameters():
        assert param.grad is not None and torch.isfinite(param.grad).all(), name
    assert routed.last_routing.idx.shape[-1] == config["topk"]


@pytest.mark.parametrize("layer_type,config", ROUTED, ids=ROUTED_IDS)
def test_routed_cached_decoding_equals_full_forward(layer_type, config):
    routed = wrap(build(FIRST_CASE[layer_type]), **config)
    x, _ = inputs()
    with torch.no_grad():
        full = routed(x)[0]
        cache = Cache()
        routed(x, past_key_values=cache, use_cache=True)
        decoded, entry = _decode(routed, x, prefill=3)
    _close(decoded, full)
    final = cache[0]["recurrent_state"]
    if isinstance(final, tuple):
        assert final[0].shape[2] == config["num_slots"] and final[1].shape[2] == 1
        final, got = torch.cat(final, 2), torch.cat(entry["recurrent_state"], 2)
    else:
        assert final.shape[2] == config["num_slots"]
        got = entry["recurrent_state"]
    _close(got, final)
    for name, conv in cache[0]["conv_state"].items():
        _close(entry["conv_state"][name], conv)


@pytest.mark.parametrize("layer_type,config", ROUTED, ids=ROUTED_IDS)
def test_routed_padding_and_packing(layer_type, config):
    """A left-padded batch equals each row run alone on its tokens; `cu_seqlens` packing equals the rows."""
    routed = wrap(build(FIRST_CASE[layer_type]), **config)
    x, mask = inputs()
    with torch.no_grad():
        padded = routed(x, attention_mask=mask)[0]
        for row in range(B):
            valid = mask[row].bool()
            alone = routed(x[row:row + 1, valid])[0]
            _close(padded[row, valid], alone[0])
        lengths = [4, T - 4]
        packed = torch.cat([x[0, :lengths[0]], x[1, :lengths[1]]])[None]
        cu = torch.tensor([0, lengths[0], sum(lengths)], dtype=torch.int32)
        out = routed(packed, cu_seqlens=cu)[0]
        _close(out[0, :lengths[0]], routed(x[:1, :lengths[0]])[0][0])
        _close(out[0, lengths[0]:], routed(x[1:, :lengths[1]])[0][0])
        # decoding a padded batch (as generate does) equals the padded full forward
        decoded, _ = _decode(routed, x, mask, prefill=5)
    valid = mask.bool()
    _close(decoded[valid], padded[valid])


def test_padding_row_without_tokens_is_an_error():
    routed = wrap(build("gla"), num_slots=2, topk=1)
    mask = torch.ones(2, 4, dtype=torch.long)
    mask[1] = 0
    with pytest.raises(ValueError, match="no token"):
        routed(torch.randn(2, 4, D), attention_mask=mask)


def test_a_decoded_token_marked_as_padding_is_an_error():
    """Decoding checks the mask on the device (no host sync): on the CPU the check raises at once."""
    routed = wrap(build("gla"), num_slots=2, topk=1)
    x, mask = torch.randn(2, 5, D), torch.ones(2, 5, dtype=torch.long)
    cache = Cache()
    routed(x[:, :4], attention_mask=mask[:, :4], past_key_values=cache, use_cache=True)
    mask[1, 4] = 0
    with pytest.raises(RuntimeError, match="attention_mask: a decoded token"):
        routed(x[:, 4:], attention_mask=mask, past_key_values=cache, use_cache=True)


# --------------------------------------------------------------------------------------------------
# A cache belongs to its layer


def _gla(**options):
    from fla.layers.gla import GatedLinearAttention

    torch.manual_seed(0)
    kwargs = dict(hidden_size=D, num_heads=2, expand_k=0.5, expand_v=1.0, use_short_conv=True, layer_idx=0)
    return GatedLinearAttention(**{**kwargs, **options}).eval()


def _filled_cache(routed, x):
    cache = Cache()
    with torch.no_grad():
        routed(x, past_key_values=cache, use_cache=True)
    return cache


MISMATCHES = {  # what made the cache, what it is given to, what the error names
    "fewer_slots": (lambda: wrap(_gla(), num_slots=8, topk=2), lambda: wrap(_gla(), num_slots=4, topk=2), "num_slots"),
    "more_slots": (lambda: wrap(_gla(), num_slots=8, topk=2), lambda: wrap(_gla(), num_slots=16, topk=2), "num_slots"),
    "heads": (lambda: wrap(_gla(), num_slots=4, topk=2), lambda: wrap(_gla(num_heads=4), num_slots=4, topk=2),
              "heads"),
    "head_dims": (lambda: wrap(_gla(), num_slots=4, topk=2), lambda: wrap(_gla(expand_k=1.0), num_slots=4, topk=2),
                  "head_k_dim"),
    "conv_size": (lambda: wrap(_gla(), num_slots=4, topk=2), lambda: wrap(_gla(conv_size=2), num_slots=4, topk=2),
                  "taps"),
    "no_conv": (lambda: wrap(_gla(use_short_conv=False), num_slots=4, topk=2),
                lambda: wrap(_gla(), num_slots=4, topk=2),
                "convolution histories"),
    "fm_into_mom": (lambda: wrap(_gla(), num_slots=4, topk=2),
                    lambda: wrap(_gla(), num_slots=4, topk=2, shared_slot=True, per_slot_kv=True), "shared_slot"),
    "mom_into_fm": (lambda: wrap(_gla(), num_slots=4, topk=2, shared_slot=True),
                    lambda: wrap(_gla(), num_slots=4, topk=2), "shared_slot"),
    "per_slot_convs": (lambda: wrap(_gla(), num_slots=4, topk=2, per_slot_kv=True),
                       lambda: wrap(_gla(), num_slots=4, topk=2), "channels"),
    "dtype": (lambda: wrap(_gla(), num_slots=4, topk=2), lambda: wrap(_gla().double(), num_slots=4, topk=2), "float64"),
}


@pytest.mark.parametrize("mismatch", sorted(MISMATCHES))
def test_a_cache_from_another_layer_is_refused(mismatch):
    """Before any work: the cache is left as it was."""
    make, take, named = MISMATCHES[mismatch]
    x = torch.randn(B, 3, D)
    cache = _filled_cache(make(), x)
    before = {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in cache[0].items()}
    layer = take()
    y = torch.randn(B, 1, D, dtype=next(layer.parameters()).dtype)
    with pytest.raises(ValueError, match="cache") as error:
        layer(y, past_key_values=cache, use_cache=True)
    assert named in str(error.value)
    assert str(cache[0]) == str(before)


def test_a_cache_for_another_batch_is_refused():
    routed = wrap(_gla(), num_slots=4, topk=2)
    cache = _filled_cache(routed, torch.randn(2, 3, D))
    with pytest.raises(ValueError, match=r"cache: .*batch 2 here 3"):
        routed(torch.randn(3, 1, D), past_key_values=cache, use_cache=True)


# --------------------------------------------------------------------------------------------------
# Models


def test_wrap_model_layer_types_and_errors():
    model = build_model("gla")
    with pytest.raises(ValueError, match="no layer to wrap"):
        wrap_model(model, layer_types=["DeltaNet"], num_slots=2, topk=1)
    wrap_model(model, layer_types="GatedLinearAttention", num_slots=2, topk=1)
    assert model.config.memplug["layers"] == ["model.layers.0.attn", "model.layers.1.attn"]
    with pytest.raises(ValueError, match="already holds wrapped layers"):
        wrap_model(model, num_slots=2, topk=1)


def test_save_load_round_trip(tmp_path):
    model = wrap_model(build_model("gla"), num_slots=3, topk=2, per_slot_kv=True, shared_slot=True,
                       router={"temperature": 0.5, "load_balance_coef": 0.01})
    with torch.no_grad():  # move the router and slot copies off their initial values
        for name, p in model.named_parameters():
            if "router" in name or "slots" in name:
                p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(tmp_path)
    restored = load_pretrained(tmp_path)
    assert type(restored).__name__ == "RoutedGLAForCausalLM" and isinstance(restored, type(model))
    layer = restored.model.layers[1].attn
    assert isinstance(layer, RoutedAdapter)
    assert layer.memory_config == model.model.layers[1].attn.memory_config
    assert layer.memory_config.router.temperature == 0.5
    state, restored_state = model.state_dict(), restored.state_dict()
    assert state.keys() == restored_state.keys()
    for key in state:
        assert torch.equal(state[key], restored_state[key]), key
    ids = token_ids()
    with torch.no_grad():
        _close(restored(ids).logits, model(ids).logits, atol=0, rtol=0)
    with pytest.raises(ValueError, match="no 'memplug' entry"):
        build_model("gla").save_pretrained(tmp_path / "plain")
        load_pretrained(tmp_path / "plain")


def test_training_on_cpu_with_fla_default_loss():
    """fla's configs ask for a fused cross-entropy kernel (CUDA only); the wrapped model trains on a
    CPU with PyTorch's, the same loss as computed from the logits, linear-fused variant included."""
    ids = token_ids()
    losses = []
    for config in (dict(), dict(fuse_cross_entropy=False, fuse_linear_cross_entropy=True)):
        model = wrap_model(build_model("gla", **config), num_slots=4, topk=2).train()
        out = model(ids, labels=ids)
        out.loss.backward()
        router = model.model.layers[0].attn.router.proj.weight
        assert router.grad is not None and bool(router.grad.abs().sum() > 0)
        losses.append(out.loss.detach())
    with torch.no_grad():
        logits = model(ids).logits
    expected = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
    _close(losses[0], expected)
    _close(losses[1], expected)


def test_load_pretrained_imports_only_trusted_model_classes(tmp_path):
    import json

    model = wrap_model(build_model("gla"), num_slots=2, topk=1)
    model.save_pretrained(tmp_path)
    config_path = tmp_path / "config.json"
    config = json.loads(config_path.read_text())
    config["memplug"]["model_class"] = "memplug_untrusted_module_xyz.Model"
    config_path.write_text(json.dumps(config))
    with pytest.raises(ValueError, match="trust_model_class=True"):
        load_pretrained(tmp_path)
    assert "memplug_untrusted_module_xyz" not in sys.modules
    with pytest.raises(ModuleNotFoundError, match="memplug_untrusted_module_xyz"):  # trusted: imported
        load_pretrained(tmp_path, trust_model_class=True)
    with pytest.raises(TypeError, match="trust_model_class"):
        load_pretrained(tmp_path, trust_model_class="yes")
    import fla.models

    restored = load_pretrained(tmp_path, model_class=fla.models.GLAForCausalLM)  # named by the caller
    assert isinstance(restored, fla.models.GLAForCausalLM)


# --------------------------------------------------------------------------------------------------
# Triton's interpreter for fla's kernels


def test_interpreter_refuses_after_fla_is_imported(monkeypatch):
    from memplug.adapters import enable_triton_interpreter, triton_interpreter

    monkeypatch.setattr(triton_interpreter, "_ENABLED", False)  # tests/conftest.py enabled it before fla
    assert "fla" in sys.modules
    before = os.environ.get("TRITON_INTERPRET")
    with pytest.raises(RuntimeError, match="fla is already imported"):
        enable_triton_interpreter()
    assert os.environ.get("TRITON_INTERPRET") == before  # nothing changed


def test_interpreter_refuses_after_triton_is_imported_without_it():
    """Importing triton defines triton.language's own jitted helpers, for a GPU when the interpreter
    is off: a fresh process that imported triton first is refused."""
    code = ("import triton\nfrom memplug.adapters import enable_triton_interpreter\n"
            "enable_triton_interpreter()")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode != 0 and "Triton is already imported without its interpreter" in done.stderr


def test_interpreter_refuses_an_untested_triton(monkeypatch):
    from memplug.adapters import enable_triton_interpreter, triton_interpreter

    monkeypatch.setattr(triton_interpreter, "_ENABLED", False)  # tests/conftest.py enabled it
    monkeypatch.setattr(triton_interpreter, "installed_triton", lambda: "3.1.0")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RuntimeError, match=r"Triton 3\.1\.0 is installed, .*tested with Triton 3\.9"):
        enable_triton_interpreter()
    assert "TRITON_INTERPRET" not in os.environ


# --------------------------------------------------------------------------------------------------
# Docs


def test_docs_examples_run():
    """Every python block of docs/adapters.md runs: those that turn on Triton's interpreter in a
    fresh process (as they say they must), the others here."""
    from memplug.adapters import supported_layers, unregister_adapter

    text = (ROOT / "docs" / "adapters.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    fresh = [block for block in blocks if "enable_triton_interpreter()" in block]
    assert len(blocks) >= 5 and len(fresh) == 1
    registered = set(supported_layers())
    try:
        namespace = {}
        for block in blocks:
            if block not in fresh:
                exec(compile(block, "docs/adapters.md", "exec"), namespace)
    finally:
        for name in supported_layers():
            if name not in registered:
                unregister_adapter(name)
    assert set(supported_layers()) == registered  # the examples' adapters are gone again
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", fresh[0]], capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]


# --------------------------------------------------------------------------------------------------
# Against fla's own kernels (the reference process)


def test_interpreter_patches(reference):
    """The patches of memplug.adapters.enable_triton_interpreter: an autotuned kernel of our own whose
    loop index calls .to(), and fla's chunked Gated DeltaNet kernel against fla's naive recurrence."""
    assert reference["self_test"]["block"] == 4  # the last config, no benchmark
    assert reference["self_test"]["max_error"] < 1e-5
    assert reference["kernel_check"] < 1e-5


@pytest.mark.parametrize("name", sorted(CASES))
def test_one_slot_reproduces_fla(reference, name):
    """num_slots=1, topk=1 computes what fla's layer computes: outputs (full, padded, decoded step by
    step, decoded with padding), and the final recurrent and convolution states of its cache."""
    ref = reference["cases"][name]
    layer = build(name)
    layer.load_state_dict(ref["state_dict"])
    x, mask = inputs()
    valid = mask.bool()
    per_slot = CASES[name][0].rsplit(".", 1)[-1] != "Mamba2"
    for routed in [wrap(layer, num_slots=1, topk=1)] + ([wrap(layer, num_slots=1, topk=1, per_slot_kv=True)]
                                                        if per_slot else []):
        with torch.no_grad():
            if "full" in ref:
                _close(routed(x)[0], ref["full"])
                _close(routed(x, attention_mask=mask)[0][valid], ref["padded"][valid])
            prefill = 0 if name in DECODE_ONLY else PREFILL
            decoded, entry = _decode(routed, x, prefill=prefill)
            _close(decoded, ref["decode"])
            if "padded_decode" in ref:
                _close(_decode(routed, x, mask)[0][valid], ref["padded_decode"][valid])
        state = entry["recurrent_state"]
        assert state.shape[2] == 1 and state.dtype == torch.float32
        expected = ref["decode_state"]
        if CASES[name][2] == "vk":  # fla keeps [N, H, V, K]; memplug [N, H, m, K, V]
            expected = expected.transpose(-1, -2)
        _close(state[:, :, 0], expected)
        if ref["decode_conv"] is not None:
            fla_conv = ref["decode_conv"]
            fla_conv = (fla_conv,) if isinstance(fla_conv, torch.Tensor) else fla_conv
            ours = entry["conv_state"]
            names = [n for n in ("q_conv1d", "k_conv1d", "v_conv1d", "conv1d") if n in ours]
            assert len(names) == len(fla_conv)
            for n, expected_conv in zip(names, fla_conv):
                _close(ours[n], expected_conv)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_one_slot_model_reproduces_fla(reference, name):
    """A wrapped fla causal LM with one slot (and the PyTorch fallbacks of its fused norms and MLP)
    gives fla's logits."""
    ref = reference["models"][name]
    model = build_model(name)
    model.load_state_dict(ref["state_dict"])
    wrap_model(model, num_slots=1, topk=1)
    with torch.no_grad():
        # Logits of order 1-3 after two layers at unit-scale activations: float32 rounding of two
        # different computations (fla's kernels in the interpreter, ours) differs by up to ~3e-5.
        _close(model(token_ids()).logits, ref["logits"], atol=1e-4)
