"""The fla layer configurations the adapter tests reproduce (shared by the reference script, which
runs fla's own kernels under Triton's interpreter, and by tests/test_adapters.py).

Dimensions are tiny and pick K != V, so that a transposed state or a swapped head split shows.
"""
from __future__ import annotations

from memplug.imports import import_object

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
    "kda": ("fla.layers.kda.KimiDeltaAttention", dict(hidden_size=D, num_heads=2, head_dim=8, expand_v=2), "vk"),
    "kda_gva_bounded_noconv": ("fla.layers.kda.KimiDeltaAttention",
                               dict(hidden_size=D, num_heads=2, num_v_heads=4, head_dim=8, expand_v=2,
                                    lower_bound=-5.0, safe_gate=True, use_short_conv=False), "vk"),
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
PADDED_DECODE = {"gla", "simple_gla", "deltanet", "gated_deltanet", "kda", "mamba2"}

B, T, PREFILL = 2, 10, 7
PAD = (3, 0)  # left padding of each row in the padded batch


def build(name: str, seed: int = 0):
    import torch

    cls, kwargs, _ = CASES[name]
    torch.manual_seed(seed)
    layer = import_object(cls)(layer_idx=0, **kwargs)
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


# Whole models: an fla causal LM of every family the adapters wrap, with short convolutions on and
# off (Mamba-2 always has its convolution). fla ships no SimpleGLA model: "simple_gla" is fla's GLA
# model with SimpleGatedLinearAttention mixers.
VOCAB = 64
LM = dict(hidden_size=D, num_hidden_layers=2, hidden_ratio=2, vocab_size=VOCAB, pad_token_id=0, bos_token_id=1,
          eos_token_id=VOCAB - 1)
_FAMILIES = {
    "gla": ("fla.models.GLAConfig", "fla.models.GLAForCausalLM", dict(num_heads=2)),
    "simple_gla": ("fla.models.GLAConfig", "fla.models.GLAForCausalLM", dict(num_heads=2)),
    "deltanet": ("fla.models.DeltaNetConfig", "fla.models.DeltaNetForCausalLM", dict(num_heads=2)),
    "gated_deltanet": ("fla.models.GatedDeltaNetConfig", "fla.models.GatedDeltaNetForCausalLM",
                       dict(num_heads=2, head_dim=8)),
}
MODELS = {f"{family}{suffix}": (config, model, dict(kwargs, use_short_conv=conv))
          for family, (config, model, kwargs) in _FAMILIES.items()
          for suffix, conv in (("", True), ("_noconv", False))}
MODELS["kda"] = ("fla.models.KDAConfig", "fla.models.KDAForCausalLM", dict(num_heads=2, head_dim=8))
MODELS["mamba2"] = ("fla.models.Mamba2Config", "fla.models.Mamba2ForCausalLM",
                    dict(head_dim=8, state_size=6, expand=2, chunk_size=8))


def build_model(name: str, seed: int = 0, **config):
    """The model `name` of MODELS with random weights of unit-scale activations (fla's initialisation,
    std 0.02, gives outputs that barely depend on the context, so a decoder that forgot the prompt
    would go unnoticed). `config` overrides options of the model's config."""
    import torch

    config_cls, model_cls, kwargs = MODELS[name]
    torch.manual_seed(seed)
    config = import_object(config_cls)(**{**LM, **kwargs, **config})
    model = import_object(model_cls)(config)
    if name.startswith("simple_gla"):
        from fla.layers.simple_gla import SimpleGatedLinearAttention

        for i, block in enumerate(model.model.layers):
            block.attn = SimpleGatedLinearAttention(hidden_size=D, num_heads=kwargs["num_heads"],
                                                    use_short_conv=kwargs["use_short_conv"], layer_idx=i)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, p[0].numel() ** -0.5)
            else:
                p.add_(0.3 * torch.randn_like(p))
    return model.eval()


def token_ids(seed: int = 2):
    import torch

    return torch.randint(0, VOCAB, (B, T), generator=torch.Generator().manual_seed(seed))
