"""Adapters of flash-linear-attention's layers: GatedLinearAttention, SimpleGatedLinearAttention,
DeltaNet, GatedDeltaNet, KimiDeltaAttention and Mamba2.

Each computes the layer's rule inputs and output with the layer's own parameters, in PyTorch (see
`torch_ops`), exactly as the layer does; only the recurrence moves to `memplug.routed_scan`:

| fla layer | memplug rule | q, k, v, g, beta |
| --- | --- | --- |
| GatedLinearAttention | gla | g = logsigmoid(gk_proj x) / gate_logit_normalizer (clamped at clamp_min) |
| SimpleGatedLinearAttention | mamba2 (scalar decay) | g = logsigmoid(gk_proj x) / gate_logit_normalizer per head |
| DeltaNet | deltanet | qk activation, l2 or sum norm, beta = sigmoid(b_proj x) (or 1) |
| GatedDeltaNet | gated_deltanet | l2-normed q, k; g = -exp(A_log) softplus(a_proj x + dt_bias); |
|  |  | beta = sigmoid(b_proj x) |
| KimiDeltaAttention | kda | l2-normed q, k; g = -exp(A_log) softplus(f_proj x + dt_bias) per key channel |
|  |  | (lower_bound: g = lower_bound sigmoid(exp(A_log) (f_proj x + dt_bias))); beta = sigmoid(b_proj x) |
| Mamba2 | mamba2, scale 1 | q = C, k = dt B, v = x, g = dt A; then + D x, gated RMS norm |

The layers are matched by their qualified class names, so importing this module does not import fla.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from memplug.modules import at_least_float32, l2norm

from . import torch_ops as ops
from .base import AdapterContext, RoutedAdapter, RuleInputs
from .registry import register_adapter


def _reject(layer, option, value, why):
    raise ValueError(f"wrap: {type(layer).__name__} with {option}={value!r} is not supported: {why}")


def _check_activation(layer, option, fn):
    try:
        ops.activation_name(fn, f"{type(layer).__name__}.{option}")
    except ValueError as error:
        raise ValueError(f"wrap: {error}") from None


def _output_gate(o, x, ctx, gate_proj, fused_norm, norm, gate_fn, gate_activation="swish"):
    """`o [B,T,H,V]` -> norm and output gate as GLA / SimpleGLA compute them -> `[B,T,H*V]`."""
    V = o.shape[-1]
    g = ctx.linear(gate_proj, x).squeeze(-2)
    if fused_norm is not None:
        return ops.norm(o, fused_norm, g.unflatten(-1, (-1, V)), gate_activation).flatten(-2)
    o = ops.norm(o, norm).flatten(-2)
    return o * ops.activation(ops.activation_name(gate_fn, "gate_fn"), "gate_fn")(g)


@register_adapter("fla.layers.gla.GatedLinearAttention")
class RoutedGatedLinearAttention(RoutedAdapter):
    """fla's `GatedLinearAttention` over rule "gla"."""

    rule = "gla"
    per_slot_modules = ("k_proj", "v_proj", "k_conv1d", "v_conv1d", "gk_proj")

    @classmethod
    def check_layer(cls, layer):
        _check_activation(layer, "feature_map", layer.feature_map_fn)
        if not layer.fuse_norm_and_gate and layer.use_output_gate:
            _check_activation(layer, "gate_fn", layer.gate_fn)

    def state_dims(self):
        return self.num_heads, self.head_k_dim, self.head_v_dim

    def rule_inputs(self, x, ctx: AdapterContext):
        K, V = self.head_k_dim, self.head_v_dim
        q, k, v = (ctx.linear(n, x) for n in ("q_proj", "k_proj", "v_proj"))
        if self.use_short_conv:
            q, k, v = ctx.conv("q_conv1d", q), ctx.conv("k_conv1d", k), ctx.conv("v_conv1d", v)
        gk = ctx.linear("gk_proj", x)
        q = ctx.heads(q, K).squeeze(3)
        k, gk, v = ctx.heads(k, K), ctx.heads(gk, K), ctx.heads(v, V)
        if self.num_kv_groups > 1:
            k, gk, v = (t.repeat_interleave(self.num_kv_groups, dim=2) for t in (k, gk, v))
        g = F.logsigmoid(at_least_float32(gk)) / self.gate_logit_normalizer
        if self.clamp_min is not None:
            g = torch.clamp_min(g, self.clamp_min)
        if self.feature_map_fn is not None:
            fmap = ops.activation(ops.activation_name(self.feature_map_fn, "feature_map"), "feature_map")
            q, k = fmap(q), fmap(k)
        return RuleInputs(q, k, v, g=g)

    def output(self, o, x, inputs, ctx):
        if self.use_output_gate:
            o = _output_gate(o, x, ctx, "g_proj", self.g_norm_swish_gate if self.fuse_norm_and_gate else None,
                             getattr(self, "g_norm", None), getattr(self, "gate_fn", None))
        else:
            o = ops.norm(o, self.g_norm).flatten(-2)
        return self.o_proj(o)


@register_adapter("fla.layers.simple_gla.SimpleGatedLinearAttention")
class RoutedSimpleGatedLinearAttention(RoutedAdapter):
    """fla's `SimpleGatedLinearAttention` (one decay per head) over rule "mamba2", scale `K ** -0.5`."""

    rule = "mamba2"
    per_slot_modules = ("k_proj", "v_proj", "k_conv1d", "v_conv1d", "gk_proj")

    @classmethod
    def check_layer(cls, layer):
        _check_activation(layer, "feature_map", layer.feature_map_fn)
        if not layer.fuse_norm_and_gate:
            _check_activation(layer, "gate_fn", layer.gate_fn)

    def state_dims(self):
        return self.num_heads, self.head_k_dim, self.head_v_dim

    def rule_inputs(self, x, ctx):
        K, V = self.head_k_dim, self.head_v_dim
        q, k, v = (ctx.linear(n, x) for n in ("q_proj", "k_proj", "v_proj"))
        if self.use_short_conv:
            q, k, v = ctx.conv("q_conv1d", q), ctx.conv("k_conv1d", k), ctx.conv("v_conv1d", v)
        if self.feature_map_fn is not None:
            fmap = ops.activation(ops.activation_name(self.feature_map_fn, "feature_map"), "feature_map")
            q, k = fmap(q), fmap(k)
        q, k, v = ctx.heads(q, K).squeeze(3), ctx.heads(k, K), ctx.heads(v, V)
        if self.num_kv_groups > 1:
            k, v = (t.repeat_interleave(self.num_kv_groups, dim=2) for t in (k, v))
        gk = ctx.heads(ctx.linear("gk_proj", x), 1)[..., 0]  # [B,T,H,c]
        g = F.logsigmoid(at_least_float32(gk)) / self.gate_logit_normalizer
        return RuleInputs(q, k, v, g=g)

    def output(self, o, x, inputs, ctx):
        o = _output_gate(o, x, ctx, "g_proj", self.g_norm_swish_gate if self.fuse_norm_and_gate else None,
                         getattr(self, "g_norm", None), getattr(self, "gate_fn", None))
        return self.o_proj(o)


def _delta_output(adapter, o, x, ctx):
    if getattr(adapter, "use_gate", True):  # KimiDeltaAttention has no option: it always gates
        g = ctx.linear("g_proj", x).squeeze(-2).unflatten(-1, (-1, o.shape[-1]))
        o = ops.norm(o, adapter.o_norm, g, getattr(adapter.o_norm, "activation", "swish"))
    else:
        o = ops.norm(o, adapter.o_norm)
    return adapter.o_proj(o.flatten(-2))


@register_adapter("fla.layers.delta_net.DeltaNet")
class RoutedDeltaNet(RoutedAdapter):
    """fla's `DeltaNet` over rule "deltanet"."""

    rule = "deltanet"
    per_slot_modules = ("k_proj", "v_proj", "k_conv1d", "v_conv1d", "b_proj")

    @classmethod
    def check_layer(cls, layer):
        if layer.allow_neg_eigval:
            _reject(layer, "allow_neg_eigval", True, "beta in (0, 2) lies outside memplug's write strengths [0, 1]")
        if layer.qk_activation not in ("silu", "relu", "elu", "identity"):
            _reject(layer, "qk_activation", layer.qk_activation, "expected silu, relu, elu or identity")
        if layer.qk_norm not in ("l2", "sum"):
            _reject(layer, "qk_norm", layer.qk_norm, "expected l2 or sum")

    def state_dims(self):
        return self.num_heads, self.head_k_dim, self.head_v_dim

    def rule_inputs(self, x, ctx):
        K, V = self.head_k_dim, self.head_v_dim
        q, k, v = (ctx.linear(n, x) for n in ("q_proj", "k_proj", "v_proj"))
        if self.use_short_conv:
            q, k, v = ctx.conv("q_conv1d", q), ctx.conv("k_conv1d", k), ctx.conv("v_conv1d", v)
        else:
            if self.qk_activation == "silu":
                q, k = F.silu(q), F.silu(k)
            v = F.silu(v)
        q, k, v = ctx.heads(q, K).squeeze(3), ctx.heads(k, K), ctx.heads(v, V)
        if self.qk_activation != "silu":
            act = ops.activation(self.qk_activation, "qk_activation")
            q, k = act(q), act(k)
        if self.qk_norm == "sum":
            q, k = ops.sum_norm(q), ops.sum_norm(k)
        else:
            q, k = l2norm(q), l2norm(k)
        if self.use_beta:
            beta = torch.sigmoid(at_least_float32(ctx.heads(ctx.linear("b_proj", x), 1)[..., 0]))
        else:
            beta = torch.ones(*q.shape[:3], 1, dtype=torch.promote_types(q.dtype, torch.float32), device=q.device)
        return RuleInputs(q, k, v, beta=beta)

    def output(self, o, x, inputs, ctx):
        return _delta_output(self, o, x, ctx)


@register_adapter("fla.layers.gated_deltanet.GatedDeltaNet")
class RoutedGatedDeltaNet(RoutedAdapter):
    """fla's `GatedDeltaNet` over rule "gated_deltanet" (num_v_heads > num_heads supported)."""

    rule = "gated_deltanet"
    per_slot_modules = ("k_proj", "v_proj", "k_conv1d", "v_conv1d", "a_proj", "b_proj")

    @classmethod
    def check_layer(cls, layer):
        if layer.allow_neg_eigval:
            _reject(layer, "allow_neg_eigval", True, "beta in (0, 2) lies outside memplug's write strengths [0, 1]")
        if layer.num_v_heads % layer.num_heads != 0:
            _reject(layer, "num_v_heads", layer.num_v_heads, f"expected a multiple of num_heads = {layer.num_heads}")

    def state_dims(self):
        return self.num_v_heads, self.head_k_dim, self.head_v_dim

    def rule_inputs(self, x, ctx):
        K, V = self.head_k_dim, self.head_v_dim
        q, k, v = (ctx.linear(n, x) for n in ("q_proj", "k_proj", "v_proj"))
        if self.use_short_conv:
            q, k, v = ctx.conv("q_conv1d", q), ctx.conv("k_conv1d", k), ctx.conv("v_conv1d", v)
        else:
            q, k, v = F.silu(q), F.silu(k), F.silu(v)
        q, k, v = ctx.heads(q, K).squeeze(3), ctx.heads(k, K), ctx.heads(v, V)
        q, k = l2norm(q), l2norm(k)
        groups = self.num_v_heads // self.num_heads
        if groups > 1:
            q, k = q.repeat_interleave(groups, dim=2), k.repeat_interleave(groups, dim=2)
        beta = torch.sigmoid(at_least_float32(ctx.heads(ctx.linear("b_proj", x), 1)[..., 0]))
        return RuleInputs(q, k, v, g=self.decay(x, ctx), beta=beta)

    def decay(self, x, ctx):
        """g = -exp(A_log) softplus(a_proj x + dt_bias), one per head `[B,T,HV,c]`."""
        a = at_least_float32(ctx.heads(ctx.linear("a_proj", x), 1)[..., 0])
        return -at_least_float32(self.A_log).exp()[:, None] * F.softplus(a + at_least_float32(self.dt_bias)[:, None])

    def output(self, o, x, inputs, ctx):
        return _delta_output(self, o, x, ctx)


@register_adapter("fla.layers.kda.KimiDeltaAttention")
class RoutedKimiDeltaAttention(RoutedGatedDeltaNet):
    """fla's `KimiDeltaAttention` over rule "kda": Gated DeltaNet's inputs (num_v_heads > num_heads
    supported) with one decay per key channel, and an output norm always gated by sigmoid."""

    rule = "kda"
    per_slot_modules = ("k_proj", "v_proj", "k_conv1d", "v_conv1d", "f_proj", "b_proj")

    def decay(self, x, ctx):
        """g = -exp(A_log) softplus(f_proj x + dt_bias) per key channel `[B,T,HV,c,K]`, or with
        `lower_bound`, lower_bound sigmoid(exp(A_log) (f_proj x + dt_bias))."""
        K = self.head_k_dim
        f = at_least_float32(ctx.heads(ctx.linear("f_proj", x), K)) + at_least_float32(self.dt_bias).view(-1, 1, K)
        A = at_least_float32(self.A_log).exp()[:, None, None]  # [HV, 1, 1] against f [B,T,HV,c,K]
        return -A * F.softplus(f) if self.lower_bound is None else self.lower_bound * torch.sigmoid(A * f)


@register_adapter("fla.layers.mamba2.Mamba2")
class RoutedMamba2(RoutedAdapter):
    """fla's `Mamba2` over rule "mamba2": per head, `k = dt * B`, `v = x`, `q = C`, `g = dt * A`,
    read scale 1, then the `D` skip and the gated RMS norm. Groups (`n_groups`) map to heads as in
    mamba_ssm: head h reads group `h // (num_heads / n_groups)`. Under coupling "dt" the routing
    weight scales `dt`. No per-slot writes (`per_slot_kv` is rejected)."""

    rule = "mamba2"
    per_slot_modules = ()
    scale = 1.0

    @classmethod
    def check_layer(cls, layer):
        if layer.activation not in ops.ACTIVATIONS:
            _reject(layer, "hidden_act", layer.activation, f"supported: {sorted(ops.ACTIVATIONS)}")
        extra = layer.in_proj.out_features - (layer.intermediate_size + layer.conv_dim + layer.num_heads)
        if extra != 0:
            _reject(layer, "in_proj.out_features", layer.in_proj.out_features,
                    "expected intermediate_size + conv_dim + num_heads")

    def state_dims(self):
        return self.num_heads, self.ssm_state_size, self.head_dim

    def rule_inputs(self, x, ctx):
        H, P, N, G = self.num_heads, self.head_dim, self.ssm_state_size, self.n_groups
        z, xBC, dt = ctx.linear("in_proj", x).squeeze(-2).split([self.intermediate_size, self.conv_dim, H], dim=-1)
        xBC = ctx.conv("conv1d", xBC.unsqueeze(-2), activation=self.activation).squeeze(-2)
        xs, Bm, Cm = xBC.split([self.intermediate_size, G * N, G * N], dim=-1)
        xs = at_least_float32(xs).unflatten(-1, (H, P))
        Bm = at_least_float32(Bm).unflatten(-1, (G, N)).repeat_interleave(H // G, dim=2)
        Cm = at_least_float32(Cm).unflatten(-1, (G, N)).repeat_interleave(H // G, dim=2)
        dt = F.softplus(at_least_float32(dt) + at_least_float32(self.dt_bias))
        if tuple(self.dt_limit) != (0.0, float("inf")):
            dt = dt.clamp(self.dt_limit[0], self.dt_limit[1])
        A = -at_least_float32(self.A_log).exp()
        k = (dt[..., None] * Bm).unsqueeze(3)
        return RuleInputs(Cm, k, xs.unsqueeze(3), g=(dt * A).unsqueeze(3), extra=(xs, z))

    def output(self, o, x, inputs, ctx):
        xs, z = inputs.extra
        D = at_least_float32(self.D).reshape(self.num_heads, -1)  # [H, 1] or [H, P]
        y = (o + xs * D).flatten(-2)
        if self.rmsnorm:
            y = ops.gated_group_rms_norm(y, z, self.norm.weight, self.norm.eps, self.norm.group_size,
                                         self.norm.norm_before_gate)
        else:
            y = y * ops.activation(self.activation, "hidden_act")(at_least_float32(z))
        return self.out_proj(y.to(x.dtype))
