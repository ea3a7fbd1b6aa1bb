"""The fla layer configurations the adapter tests reproduce (shared by the reference script, which
runs fla's own kernels under Triton's interpreter, and by tests/test_adapters.py).

Dimensions are tiny and pick K != V, so that a transposed state or a swapped head split shows.
"""
from __future__ import annotations

D = 32  # hidden size

# name -> (fla layer class, constructor kwargs, layout of fla's recurrent state: "vk" = [N,H,V,K])
CASES = {
    "gla": ("fla.layers.gla.GatedLinearAttention",
            dict(hidden_size=D, num_heads=2, expand_k=0.5, expand_v=1.0, use_short_conv=True, conv_bias=True), "vk"),
    "gla_gqa_relu_unfused": ("fla.layers.gla.GatedLinearAttention",
                             dict(hidden_size=D, num_heads=4, num_kv_heads=2, expand_k=0.5, expand_v=1.0,
                                  feature_map="relu", fuse_norm=False, clamp_min=-0.3), "vk"),
    "gla_no_gate": ("fla.layers.gla.GatedLinearAttention",
                    dict(hidden_size=D, num_heads=2, expand_k=0.5, use_output_gate=False, use_short_conv=True), "vk"),
    "simple_gla": ("fla.layers.simple_gla.SimpleGatedLinearAttention",
                   dict(hidden_size=D, num_heads=2, expand_k=0.5, expand_v=1.0), "vk"),
    "simple_gla_gqa_unfused": ("fla.layers.simple_gla.SimpleGatedLinearAttention",
                               dict(hidden_size=D, num_heads=4, num_kv_heads=2, expand_k=0.5, fuse_norm=False,
                                    use_short_conv=False), "vk"),
    "deltanet": ("fla.layers.delta_net.DeltaNet",
                 dict(hidden_size=D, num_heads=2, expand_k=0.5, expand_v=1.0), "kv"),
    "deltanet_gate_relu_sum": ("fla.layers.delta_net.DeltaNet",
                               dict(hidden_size=D, num_heads=2, expand_k=0.5, use_gate=True, qk_activation="relu",
                                    qk_norm="sum", conv_bias=True), "kv"),
    "deltanet_nobeta_noconv_elu": ("fla.layers.delta_net.DeltaNet",
                                   dict(hidden_size=D, num_heads=2, expand_k=0.5, use_beta=False,
                                        use_short_conv=False, qk_activation="elu"), "kv"),
    "gated_deltanet": ("fla.layers.gated_deltanet.GatedDeltaNet",
                       dict(hidden_size=D, num_heads=2, head_dim=8, expand_v=2), "vk"),
    "gated_deltanet_gva_nogate": ("fla.layers.gated_deltanet.GatedDeltaNet",
                                  dict(hidden_size=D, num_heads=2, num_v_heads=4, head_dim=8, expand_v=2,
                                       use_gate=False), "vk"),
    "gated_deltanet_sigmoid_noconv": ("fla.layers.gated_deltanet.GatedDeltaNet",
                                      dict(hidden_size=D, num_heads=2, head_dim=8, expand_v=2,
                                           output_gate_activation="sigmoid", use_short_conv=False), "vk"),
    "mamba2": ("fla.layers.mamba2.Mamba2",
               dict(hidden_size=D, head_dim=8, state_size=6, expand=2, n_groups=1, chunk_size=8, backend="triton"),
               "vk"),
    "mamba2_groups": ("fla.layers.mamba2.Mamba2",
                      dict(hidden_size=D, head_dim=8, state_size=6, expand=2, n_groups=2, D_has_hdim=True,
                           norm_before_gate=True, dt_limit=(0.01, 0.5), chunk_size=8, backend="triton"), "vk"),
    "mamba2_no_norm": ("fla.layers.mamba2.Mamba2",
                       dict(hidden_size=D, head_dim=8, state_size=6, expand=2, rmsnorm=False, chunk_size=8,
                            backend="triton"), "vk"),
}

# Mamba-2 with n_groups > 1: fla's full-sequence PyTorch path (`Mamba2.torch_forward`) tiles the
# groups over the heads (`B.repeat`), while its decoding path and mamba_ssm's kernels give head h the
# group h // (heads / groups). The reference for these cases is fla's decoding path only.
DECODE_ONLY = {"mamba2_groups"}

# Cases whose reference also decodes with a padding mask (one per layer type; decoding under the
# interpreter is the slow part).
PADDED_DECODE = {"gla", "simple_gla", "deltanet", "gated_deltanet", "mamba2"}

B, T, PREFILL = 2, 10, 7
PAD = (3, 0)  # left padding of each row in the padded batch


def import_class(qualified: str):
    import importlib

    module, _, name = qualified.rpartition(".")
    return getattr(importlib.import_module(module), name)


def build(name: str, seed: int = 0):
    import torch

    cls, kwargs, _ = CASES[name]
    torch.manual_seed(seed)
    layer = import_class(cls)(layer_idx=0, **kwargs)
    # Non-trivial norm weights and biases, so that a dropped weight shows.
    with torch.no_grad():
        for pname, p in layer.named_parameters():
            if "norm" in pname or pname.endswith("bias"):
                p.add_(0.3 * torch.randn_like(p))
    return layer.eval()


def inputs(seed: int = 1):
    import torch

    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, T, D, generator=g)
    mask = torch.ones(B, T, dtype=torch.long)
    for row, pad in enumerate(PAD):
        mask[row, :pad] = 0
    return x, mask


# Whole models: the unwrapped fla model under the interpreter (fused RMSNorm with residual, fused
# SwiGLU MLP) against the wrapped one-slot model with its PyTorch fallbacks.
MODELS = {
    "gla": ("fla.models.GLAConfig", "fla.models.GLAForCausalLM",
            dict(hidden_size=D, num_hidden_layers=2, num_heads=2, hidden_ratio=2, vocab_size=64, use_short_conv=True)),
    "mamba2": ("fla.models.Mamba2Config", "fla.models.Mamba2ForCausalLM",
               dict(hidden_size=D, num_hidden_layers=2, head_dim=8, state_size=6, expand=2, vocab_size=64,
                    chunk_size=8)),
}


def build_model(name: str, seed: int = 0, **overrides):
    import torch

    config_cls, model_cls, kwargs = MODELS[name]
    torch.manual_seed(seed)
    config = import_class(config_cls)(**{**kwargs, **overrides})
    return import_class(model_cls)(config).eval()


def token_ids(seed: int = 2):
    import torch

    return torch.randint(0, 64, (B, T), generator=torch.Generator().manual_seed(seed))
