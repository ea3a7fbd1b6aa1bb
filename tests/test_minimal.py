"""`backends/minimal.py`, the chunked routed scan in one screen, equals the reference in float64."""
import torch
from hypothesis import given, settings, strategies as st

import memplug
from memplug.backends.minimal import minimal_scan


@settings(max_examples=60, deadline=None)
@given(rule=st.sampled_from(memplug.available_rules()), coupling=st.sampled_from(["dt", "none"]),
       per_route=st.booleans(), T=st.integers(1, 40), m=st.integers(1, 5), chunk_size=st.integers(1, 17),
       with_state=st.booleans(), seed=st.integers(0, 2 ** 16))
def test_minimal_scan_equals_the_reference(rule, coupling, per_route, T, m, chunk_size, with_state, seed):
    gen = torch.Generator().manual_seed(seed)
    rand = lambda *s: torch.rand(*s, generator=gen, dtype=torch.float64)
    B, H, K, V = 2, 2, 4, 3
    R = 1 + seed % m
    r = memplug.get_rule(rule)
    route = (R,) if per_route else ()
    Hr = H if per_route else 1
    kw = dict(route_idx=torch.rand(B, T, Hr, m, generator=gen).argsort(-1)[..., :R], route_w=rand(B, T, Hr, R) / R,
              read_w=rand(B, T, Hr, R), num_slots=m, coupling=coupling, scale=0.7,
              g=None if r.g is None else -2 * rand(B, T, H, *route, *((K,) if r.g == "vector" else ())),
              beta=rand(B, T, H, *route) if r.beta else None,
              initial_state=rand(B, H, m, K, V) if with_state else None)
    q, v = rand(B, T, H, K), rand(B, T, H, *route, V)
    k = torch.nn.functional.normalize(rand(B, T, H, *route, K), dim=-1)
    o, S = minimal_scan(q, k, v, rule=rule, chunk_size=chunk_size, **kw)
    o_ref, S_ref = memplug.routed_scan(q, k, v, rule=r, output_final_state=True, backend="reference", **kw)
    torch.testing.assert_close(o, o_ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(S, S_ref, rtol=1e-10, atol=1e-10)


def test_a_token_leaves_the_slots_it_does_not_route_to_alone():
    """A rule whose coupling maps zero inputs to a write and a decay: unrouted slots must not see them."""
    from memplug.rules import Coupled

    memplug.register_rule("offset_writes", g="scalar", family="additive_scalar",
                          couple=lambda k, v, g, beta, w: Coupled(k + 1, v + 1, g - 0.1, None))
    try:
        gen = torch.Generator().manual_seed(0)
        rand = lambda *s: torch.rand(*s, generator=gen, dtype=torch.float64)
        B, T, H, K, V, m = 1, 9, 2, 3, 2, 3
        kw = dict(route_idx=torch.randint(0, m, (B, T, 1, 1), generator=gen), route_w=rand(B, T, 1, 1),
                  num_slots=m, g=-rand(B, T, H), beta=None, read_w=None, coupling="none", scale=1.0,
                  initial_state=rand(B, H, m, K, V))
        q, k, v = rand(B, T, H, K), rand(B, T, H, K), rand(B, T, H, V)
        rule = memplug.get_rule("offset_writes")
        o, S = minimal_scan(q, k, v, rule=rule, chunk_size=4, **kw)
        o_ref, S_ref = memplug.routed_scan(q, k, v, rule=rule, output_final_state=True, backend="reference", **kw)
        torch.testing.assert_close(o, o_ref, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(S, S_ref, rtol=1e-10, atol=1e-10)
    finally:
        memplug.unregister_rule("offset_writes")
