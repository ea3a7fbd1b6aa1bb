"""A small causal language model whose token mixer is any memory configuration.

    tokens -> embedding -> N x [ x + memory(norm(x)); x + mlp(norm(x)) ] -> norm -> tied head

`MEMORIES` is the one place where the compared memory configurations are defined: each is a
`RoutedMemory` class (or preset) and its keyword arguments, given the rule and the number of slots
`m` and routes `R`, so any two configurations are one entry apart. `backbone_xN` names a point of the
backbone frontier: the plain rule with N times the state.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from memplug import FactorizationMemory, MixtureOfMemories, RoutedMemory
from memplug.modules import RMSNorm
from memplug.routing import Router

# name -> (layer class, kwargs given m and R, description). The rule is passed as `rule=` to all.
MEMORIES = {
    "backbone": (RoutedMemory, lambda m, R: dict(num_slots=1, topk=1, coupling="none"),
                 "the plain rule: one state per head (m = 1, R = 1, w = 1)"),
    "fm_dense": (FactorizationMemory,
                 lambda m, R: dict(num_slots=m, topk=m, router={"kind": "dense", "rms_norm_input": True}),
                 "Factorization Memory, every slot updated with its softmax weight (R = m)"),
    "fm_sparse": (FactorizationMemory, lambda m, R: dict(num_slots=m, topk=R),
                  "Factorization Memory, top-R of m slots (R < m)"),
    "mom": (MixtureOfMemories, lambda m, R: dict(num_slots=m, topk=R),
            "Mixture-of-Memories: per-slot k/v, top-R of m slots, plus a shared always-on slot"),
    "raven": (RoutedMemory, lambda m, R: dict(num_slots=m, topk=R, coupling="dt",
                                              router=dict(per_head=True, score="sigmoid", gumbel_noise=True,
                                                          balance_rate=1e-3)),
              "Raven-style routing: per-head top-R of m slots by sigmoid scores, Gumbel noise in training, "
              "auxiliary-loss-free balancing bias"),
}
# The backbone frontier: "backbone_xN" is the plain rule with N times the value width (head_v_dim),
# hence N times the backbone's state (and more parameters in its value, gate and output maps).
FRONTIER = re.compile(r"backbone_x([1-9][0-9]*)")


def parse_memory(memory: str) -> tuple[str, int]:
    """`(configuration, value-width factor)`: ("fm_sparse", 1), ("backbone", 9) for "backbone_x9"."""
    if not isinstance(memory, str):
        raise ValueError(f"memory: expected a name, got {memory!r}")
    frontier = FRONTIER.fullmatch(memory)
    if frontier:
        return "backbone", int(frontier.group(1))
    if memory not in MEMORIES:
        raise ValueError(f"memory: unknown configuration {memory!r}; known: {sorted(MEMORIES)}, and "
                         f"backbone_xN (the backbone with N times its value width)")
    return memory, 1


def build_memory(memory: str, rule: str, config: "ModelConfig") -> nn.Module:
    """The memory layer of configuration `memory` with update rule `rule` at the sizes of `config`."""
    name, factor = parse_memory(memory)
    cls, make, _ = MEMORIES[name]
    kwargs = {"rule": rule, **make(config.num_slots, config.topk), **config.layer}
    build = lambda kw: cls(config.d_model, config.num_heads, config.head_k_dim, factor * config.head_v_dim, **kw)
    if not config.router or name == "backbone":  # one slot: no router to set
        return build(kwargs)
    with torch.random.fork_rng(devices=[]):  # reading the configuration's own router draws no numbers
        own = build(kwargs).config["router"]
    return build({**kwargs, "router": {**own, **config.router}})


@dataclass
class ModelConfig:
    """Sizes of the model. `layer` holds extra `RoutedMemory` arguments for every configuration
    (e.g. `short_conv`, `backend`); `num_slots` / `topk` are `m` / `R` of the routed ones; `router`
    holds router options set over each routed configuration's own router (e.g. `capacity_factor`)."""

    d_model: int = 64
    n_layers: int = 2
    num_heads: int = 2
    head_k_dim: int = 16
    head_v_dim: int = 16
    mlp_ratio: float = 2.0
    num_slots: int = 8
    topk: int = 2
    router_init: str = "default"  # "default": PyTorch's; "zero": top-k routers start with every token on the same slots
    layer: dict = field(default_factory=dict)
    router: dict = field(default_factory=dict)


class MLP(nn.Module):
    def __init__(self, d_model, hidden):
        super().__init__()
        self.up = nn.Linear(d_model, 2 * hidden, bias=False)
        self.down = nn.Linear(hidden, d_model, bias=False)

    def forward(self, x):
        a, b = self.up(x).chunk(2, -1)
        return self.down(F.silu(a) * b)


class Block(nn.Module):
    def __init__(self, d_model, memory: nn.Module, mlp_ratio):
        super().__init__()
        self.norm1, self.memory = RMSNorm(d_model), memory
        hidden = int(mlp_ratio * d_model)
        self.norm2, self.mlp = (RMSNorm(d_model), MLP(d_model, hidden)) if hidden > 0 else (None, None)

    def forward(self, x, cache=None, use_cache=False):
        y, cache, aux = self.memory(self.norm1(x), cache=cache, use_cache=use_cache)
        x = x + y
        if self.mlp is not None:
            x = x + self.mlp(self.norm2(x))
        return x, cache, aux


class LM(nn.Module):
    """`forward(tokens [B,T], caches=None, use_cache=False) -> (logits [B,T,vocab], caches, aux)`
    with `aux["aux_loss"]` the layers' load-balancing losses summed (add it to the loss) and
    `aux["routing"]` each layer's `Routing` (None for one slot). `caches` is one `MemoryCache` per
    layer: passing them continues the sequences, so decoding costs the same at every step."""

    def __init__(self, vocab_size: int, config: ModelConfig, memory: str = "backbone", rule: str = "gated_deltanet"):
        super().__init__()
        c = config
        self.config, self.memory_name, self.rule = config, memory, rule
        self.embed = nn.Embedding(vocab_size, c.d_model)
        self.blocks = nn.ModuleList(Block(c.d_model, build_memory(memory, rule, c), c.mlp_ratio)
                                    for _ in range(c.n_layers))
        self.norm = RMSNorm(c.d_model)
        self.head = nn.Linear(c.d_model, vocab_size, bias=False)
        self.head.weight = self.embed.weight  # tied
        self.apply(self._init)
        if c.router_init == "zero":  # not dense routers: zero would keep their slots identical forever
            for module in self.modules():
                if isinstance(module, Router) and module.config.kind != "dense":
                    nn.init.zeros_(module.proj.weight)
        elif c.router_init != "default":
            raise ValueError(f"router_init: expected 'zero' or 'default', got {c.router_init!r}")

    @staticmethod
    def _init(module):
        if isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=0.02)

    def state_numel(self) -> int:
        """Numbers in the recurrent state of one sequence, all layers."""
        return sum(block.memory.state_numel() for block in self.blocks)

    def active_state_numel(self) -> int:
        """Numbers of the state one token writes, all layers (`RoutedMemory.active_state_numel`)."""
        return sum(block.memory.active_state_numel() for block in self.blocks)

    def memory_flops_per_token(self) -> int:
        """Forward FLOPs of one token in the memory layers (`RoutedMemory.flops_per_token`)."""
        return sum(block.memory.flops_per_token() for block in self.blocks)

    def memory_params(self) -> int:
        """Parameters of the memory layers."""
        return sum(p.numel() for block in self.blocks for p in block.memory.parameters())

    def forward(self, tokens, caches=None, use_cache=False):
        x = self.embed(tokens)
        new_caches, aux_loss, routing = [], x.new_zeros(()), []
        for i, block in enumerate(self.blocks):
            x, cache, aux = block(x, None if caches is None else caches[i], use_cache)
            new_caches.append(cache)
            aux_loss = aux_loss + aux["aux_loss"]
            routing.append(aux["routing"])
        logits = self.head(self.norm(x))
        caches = new_caches if (use_cache or caches is not None) else None
        return logits, caches, {"aux_loss": aux_loss, "routing": routing}

    @torch.no_grad()
    def generate(self, prompt, max_new_tokens: int, use_cache: bool = True):
        """Greedy decoding: `prompt [B,T]` -> `[B, T + max_new_tokens]`. With the cache, the prompt
        is read once and every new token costs one step; without it, each step reruns the whole
        sequence (the slow path, for checking the fast one)."""
        tokens = prompt
        if not use_cache:
            for _ in range(max_new_tokens):
                nxt = self(tokens)[0][:, -1].argmax(-1, keepdim=True)
                tokens = torch.cat([tokens, nxt], 1)
            return tokens
        logits, caches, _ = self(prompt, use_cache=True)
        for i in range(max_new_tokens):
            nxt = logits[:, -1].argmax(-1, keepdim=True)
            tokens = torch.cat([tokens, nxt], 1)
            if i + 1 < max_new_tokens:
                logits, caches, _ = self(nxt, caches=caches)
        return tokens
