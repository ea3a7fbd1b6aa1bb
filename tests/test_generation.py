"""Cached generation of wrapped fla causal LMs, by fla's own generation protocol.

For every family (GLA, SimpleGLA, DeltaNet, Gated DeltaNet, Mamba-2; short convolutions on and
off) and memory (one slot, routed, MoM-style with per-slot writes and a shared slot): a batch with
left padding and its `attention_mask`, a prompt prefilled in one call or in chunks, then one token
per call through fla's `Cache`. Every step's logits must equal the no-cache logits of its sequence
alone (relative error <= 1e-4 in float32), and so must the logits `generate` reports. The weights
are random at unit scale (`fla_cases.build_model`), and `test_a_forgotten_prompt_shows` checks that
a decoder that lost its state would miss that tolerance by far.
"""
from __future__ import annotations

import sys
import warnings
from pathlib import Path

import pytest
import torch

from memplug.adapters import wrap_model

sys.path.insert(0, str(Path(__file__).parent))
from support.fla_cases import MODELS, VOCAB, build_model  # noqa: E402

pytest.importorskip("fla")
from fla.models.utils import Cache  # noqa: E402

warnings.filterwarnings("ignore", message=".*(ShortConvolution|fast path|Triton|causal_conv1d|deprecated).*")

PADS = (0, 3, 5)  # left padding of each row
PROMPT, NEW = 12, 6
CHUNKS = {"whole": (PROMPT,), "chunks": (7, PROMPT)}  # prefill ends; each chunk holds a token of every row
TOLERANCE = 1e-4


def _memories(family):
    mom = dict(num_slots=3, topk=2, coupling="none", shared_slot=True, router={"per_head": True},
               per_slot_kv=family != "mamba2")  # Mamba-2's write path is one fused projection
    return {"one_slot": dict(num_slots=1, topk=1), "routed": dict(num_slots=4, topk=2), "mom": mom}


CASES = [(family, memory) for family in sorted(MODELS) for memory in _memories(family)]


def _wrapped(family, memory):
    return wrap_model(build_model(family), **_memories(family)[memory])


def _tokens(seed=0):
    """Token ids `[3, PROMPT + NEW]` (pad id 0 where the prompt is padded) and the prompt's mask."""
    ids = torch.randint(2, VOCAB - 1, (len(PADS), PROMPT + NEW), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones(len(PADS), PROMPT, dtype=torch.long)
    for row, pad in enumerate(PADS):
        ids[row, :pad] = 0
        mask[row, :pad] = 0
    return ids, mask


def _alone(model, ids, row):
    """No-cache logits of row `row` without its padding: `[length, vocab]`."""
    with torch.no_grad():
        return model(ids[row:row + 1, PADS[row]:], use_cache=False).logits[0]


def _relative_errors(got, expected):
    """Per position: ||got - expected|| / ||expected||."""
    return ((got - expected).norm(dim=-1) / expected.norm(dim=-1)).tolist()


@pytest.mark.parametrize("prefill", sorted(CHUNKS))
@pytest.mark.parametrize("family, memory", CASES)
def test_cached_decoding_equals_full_forward(family, memory, prefill):
    model = _wrapped(family, memory)
    ids, mask = _tokens()
    full_mask = torch.cat([mask, torch.ones(len(PADS), NEW, dtype=torch.long)], 1)
    cache, logits, start = Cache(), [], 0
    with torch.no_grad():
        for end in CHUNKS[prefill] + tuple(range(PROMPT + 1, PROMPT + NEW + 1)):
            out = model(ids[:, start:end], attention_mask=full_mask[:, :end], past_key_values=cache, use_cache=True)
            logits.append(out.logits)
            start = end
    cached = torch.cat(logits, 1)
    for row, pad in enumerate(PADS):
        errors = _relative_errors(cached[row, pad:], _alone(model, ids, row))
        assert max(errors) <= TOLERANCE, (row, errors)


@pytest.mark.parametrize("family, memory", CASES)
def test_generate_logits_equal_full_forward(family, memory):
    """`generate` with the cache: each generated step's logits against the full forward."""
    model = _wrapped(family, memory)
    ids, mask = _tokens()
    with torch.no_grad():
        out = model.generate(ids[:, :PROMPT], attention_mask=mask, max_new_tokens=NEW, min_new_tokens=NEW,
                             do_sample=False, pad_token_id=0, use_cache=True, output_logits=True,
                             return_dict_in_generate=True)
    assert out.sequences.shape == (len(PADS), PROMPT + NEW) and len(out.logits) == NEW
    steps = torch.stack(out.logits, 1)  # [rows, NEW, vocab]: the logits each new token was chosen from
    for row, pad in enumerate(PADS):
        expected = _alone(model, out.sequences, row)[PROMPT - pad - 1:-1]
        errors = _relative_errors(steps[row], expected)
        assert max(errors) <= TOLERANCE, (row, errors)
        # greedy choice; min_new_tokens keeps the end token (the last id) from being chosen
        assert torch.equal(out.sequences[row, PROMPT:], expected[:, :VOCAB - 1].argmax(-1))


@pytest.mark.parametrize("family", sorted(MODELS))
def test_a_forgotten_prompt_shows(family):
    """The models' outputs depend on their context far beyond the tolerance: decoding the last
    token from an empty state (what fla's models did under transformers' `cache=` keyword) misses
    the full forward's logits by more than 100 times TOLERANCE."""
    model = _wrapped(family, "routed")
    ids, _ = _tokens()
    with torch.no_grad():
        fresh = model(ids[:1, -1:], use_cache=True).logits[0]
    assert _relative_errors(fresh, _alone(model, ids, 0)[-1:])[0] > 100 * TOLERANCE
