"""VAR building blocks that the golden vectors do not cover: shared AdaLN (d36) and the phi schedule."""

from __future__ import annotations

import torch

from adapters.var import VARConfig, VQVAEConfig, build_model
from adapters.var.vqvae import PhiPartiallyShared


def test_phi_schedule_for_ten_scales_matches_the_reference():
    phi = PhiPartiallyShared(4, 4, 0.5)
    assert [phi.index(si, 10) for si in range(10)] == [0, 0, 1, 1, 1, 2, 2, 3, 3, 3]  # var.md §5.6
    # golden patch list 1..5: the float64 near-tie at si/(K-1) = 0.5 resolves to 2 (golden f_hat depends on it)
    assert [phi.index(si, 5) for si in range(5)] == [0, 1, 2, 2, 3]


def test_shared_adaln_equals_per_block_adaln_with_the_same_modulation():
    """d36's modulation ada_gss_i + Linear(SiLU(c)) must act exactly like a per-block Linear whose
    bias is b + ada_gss_i (same chunk order gamma1, gamma2, scale1, scale2, shift1, shift2)."""
    common = dict(depth=2, embed_dim=64, num_heads=1, patch_nums=(1, 2, 3), vocab_size=64, num_classes=10)
    vq = VQVAEConfig(vocab_size=64, ch=32, ch_mult=(1, 1))
    shared = build_model(VARConfig(shared_aln=True, **common), vq, var_weights="random", vae_weights="random", seed=1)
    plain = build_model(VARConfig(shared_aln=False, **common), vq, var_weights="random", vae_weights="random", seed=1)
    s, p = shared.transformer, plain.transformer
    with torch.no_grad():
        target = p.state_dict()
        for name, tensor in s.state_dict().items():
            if name in target:  # everything but the modulation
                target[name].copy_(tensor)
        lin = s.shared_ada_lin[1]
        for i, block in enumerate(p.blocks):
            gss = s.blocks[i].ada_gss
            assert gss.abs().max() > 0.1  # the per-block offsets really matter
            block.ada_lin[1].weight.copy_(lin.weight)
            block.ada_lin[1].bias.copy_(lin.bias + gss.reshape(-1))
    plain.vqvae.load_state_dict(shared.vqvae.state_dict())
    indices = [torch.randint(0, 64, (2, n * n), generator=torch.Generator().manual_seed(n)) for n in (1, 2, 3)]
    a = shared.teacher_forced([1, 2], indices, cfg=2.0)
    b = plain.teacher_forced([1, 2], indices, cfg=2.0)
    for la, lb in zip(a.logits, b.logits):
        torch.testing.assert_close(la, lb, rtol=1e-5, atol=1e-5)
    # and the per-block offsets are used: zeroing one block's ada_gss changes the logits
    with torch.no_grad():
        s.blocks[1].ada_gss.zero_()
    c = shared.teacher_forced([1, 2], indices, cfg=2.0)
    assert (c.logits[-1] - a.logits[-1]).abs().max() > 1e-3


def test_policies_receive_attention_queries_and_raw_projections():
    """queries = normalize(raw + q_bias)·exp(min(scale_mul, ln 100)), raw = x·W_qᵀ (no bias), for all
    2B rows; what a policy gets is what the model attended with."""
    import attrs
    import torch.nn.functional as F

    from adapters import load_model
    from kvpolicy import Policy, Selection, register_policy
    from adapters.var.model import MAX_SCALE_MUL

    seen = []

    @register_policy("test_var_query_probe")
    @attrs.define(kw_only=True)
    class Probe(Policy):
        needs_queries = True
        needs_raw_queries = True
        requires_budget = False
        stateful = True  # so that select runs although nothing is evicted

        def select(self, keys, values, ctx):
            seen.append((ctx.layer, ctx.scale, ctx.queries, ctx.raw_queries, keys))
            return Selection(None, ctx.state)

    model = load_model("var-tiny-random")
    model.generate([1, 2], seed=0, policy=Probe(), top_k=0, top_p=0)
    depth, heads, hd = model.config.depth, model.config.num_heads, model.config.head_dim
    assert len(seen) == depth * 10
    for layer, scale, queries, raw, keys in seen:
        attn = model.transformer.blocks[layer].attn
        assert queries.shape == raw.shape == (4, heads, model.schedule.tokens(scale), hd)
        expected = F.normalize(raw + attn.q_bias.view(1, heads, 1, hd), dim=-1)
        expected = expected * attn.scale_mul_1H11.clamp_max(MAX_SCALE_MUL).exp()
        torch.testing.assert_close(queries, expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(keys.norm(dim=-1), torch.ones(keys.shape[:3]), rtol=1e-5, atol=1e-5)
