"""Reference outputs of flash-linear-attention's own layers, computed on the CPU by fla's Triton
kernels under Triton's interpreter (`memplug.adapters.enable_triton_interpreter`). Run as a script
in its own process, since the interpreter must be on before fla is imported:

    python tests/support/fla_reference.py OUT.pt [CASE ...]

OUT.pt holds, per case of `fla_cases.CASES`: the layer's state dict; its output on the inputs of
`fla_cases.inputs` (full sequence, and with left padding); the outputs and final cache of cached
decoding (a prefill of `PREFILL` tokens, then one token per call; for the cases of `PADDED_DECODE`
also with the padding mask).
It also holds the logits of the small causal LMs of `fla_cases.MODELS` with their state dicts, and
the results of the interpreter patches' self-checks.
"""
from __future__ import annotations

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from memplug.adapters import enable_triton_interpreter, interpreter_self_test  # noqa: E402

enable_triton_interpreter()

import torch  # noqa: E402

from support.fla_cases import (CASES, DECODE_ONLY, MODELS, PADDED_DECODE, PREFILL, build, build_model,  # noqa: E402
                               inputs, token_ids)


def _kernel_check():
    """fla's chunked Gated DeltaNet kernel (its loop indices need the patch) against fla's naive
    recurrent reference: the largest absolute difference of outputs and final states."""
    from fla.ops.gated_delta_rule import chunk_gated_delta_rule
    from fla.ops.gated_delta_rule.naive import naive_recurrent_gated_delta_rule

    g = torch.Generator().manual_seed(0)
    Bk, Tk, Hk, K, V = 1, 20, 2, 8, 4
    q, k = (torch.nn.functional.normalize(torch.randn(Bk, Tk, Hk, K, generator=g), dim=-1) for _ in range(2))
    v = torch.randn(Bk, Tk, Hk, V, generator=g)
    beta = torch.rand(Bk, Tk, Hk, generator=g)
    gate = -torch.rand(Bk, Tk, Hk, generator=g)
    o, s = chunk_gated_delta_rule(q, k, v, gate, beta, output_final_state=True)
    o_ref, s_ref = naive_recurrent_gated_delta_rule(q, k, v, beta, gate, output_final_state=True)
    return max(float((o - o_ref).abs().max()), float((s - s_ref).abs().max()))


def _zero_mamba_cache(layer, batch):
    from fla.models.utils import Cache

    cache = Cache()
    cache.update(recurrent_state=torch.zeros(batch, layer.num_heads, layer.head_dim, layer.ssm_state_size),
                 conv_state=torch.zeros(batch, layer.conv_dim, layer.conv_kernel_size), layer_idx=0, offset=0)
    return cache


def _decode(layer, x, mask=None, start_empty=False):
    from fla.models.utils import Cache

    cache = _zero_mamba_cache(layer, x.shape[0]) if start_empty else Cache()
    first = 0 if start_empty else PREFILL
    outputs = []
    if first:
        outputs.append(layer(x[:, :first], attention_mask=None if mask is None else mask[:, :first],
                             past_key_values=cache, use_cache=True)[0])
    for t in range(first, x.shape[1]):
        outputs.append(layer(x[:, t:t + 1], attention_mask=None if mask is None else mask[:, :t + 1],
                             past_key_values=cache, use_cache=True)[0])
    state = cache[0]
    return torch.cat(outputs, 1), state["recurrent_state"], state["conv_state"]


def case_reference(name):
    layer = build(name)
    x, mask = inputs()
    out = {"state_dict": {k: v.clone() for k, v in layer.state_dict().items()}}
    decode_only = name in DECODE_ONLY
    if not decode_only:
        # Grad mode on: Gated DeltaNet and SimpleGLA then take their chunked kernels.
        with torch.enable_grad():
            out["full"] = layer(x)[0].detach()
        with torch.no_grad():
            out["padded"] = layer(x, attention_mask=mask)[0]
    with torch.no_grad():
        out["decode"], out["decode_state"], out["decode_conv"] = _decode(layer, x, start_empty=decode_only)
        if name in PADDED_DECODE:
            out["padded_decode"], _, _ = _decode(layer, x, mask)
    return out


def model_reference(name):
    model = build_model(name)
    with torch.no_grad():
        logits = model(token_ids()).logits
    return {"state_dict": {k: v.clone() for k, v in model.state_dict().items()}, "logits": logits}


def main(path, names):
    started = time.time()
    result = {"self_test": interpreter_self_test(), "kernel_check": _kernel_check(), "cases": {}, "models": {}}
    for name in names or CASES:
        result["cases"][name] = case_reference(name)
    if not names:
        for name in MODELS:
            result["models"][name] = model_reference(name)
    result["seconds"] = time.time() - started
    torch.save(result, path)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
