"""GuidersNAG beyond test_nag.py: LTX-2 (the audio-video model), next to ComfyUI's own NAGuidance (0.33.0), and
NAG + PAG batched against sequential on more cross-attention families.

LTX-2 (tiny_models.make_ltxav, a real KSampler on the (video, audio) latent): NAG acts in every block's video
``attn2`` (the video stream's text cross-attention); the audio's ``audio_attn2`` is left alone. The reference
is written here from the host's modules, never through the pack's hooks: during a reference pass of the
unpatched model each video ``attn2``'s forward is replaced by one that computes q, k, v with the module's own
layers (q_norm, k_norm), both attentions with a softmax written here, the paper's combination per token
(test_nag.paper_nag, float64) on the cond rows, then ``to_out``. The negative is made into the video context as
written here from the host: the first ``caption_channels`` features (the video half of LTX-2's context) through
``caption_projection``.

Breaks tried (each fails ``test_nag_on_ltx_2_matches_the_paper``):
- the audio half of the negative taken instead of the video half (``_ltx_2_negative`` returning its audio context);
- NAG in the audio's text attention too (the site's attribute matched as a suffix, ``audio_attn2`` included);
- Z⁺ and Z⁻ swapped in nodes/host/nag.py.
Elsewhere: NAG on the uncond rows too (``_positive_rows`` taking tag 1) fails the NAGuidance tests; NAG on the
cond chunk only (PAG's branch left out of ``_positive_rows``) fails ``test_nag_reaches_pags_perturbed_branch``.
"""

from __future__ import annotations

import pytest
import torch
from harness import ForwardCounter
from support import assert_parity, node, relative_error, sample_family
from test_family_ltx2 import assert_parity as assert_av_parity
from test_family_ltx2 import host_has_ltx_2_3
from test_family_ltx2 import run as run_ltx2
from test_nag import LATENT_SIZE, negative_of, paper_nag, softmax_attention

GuidanceError = ValueError
PHI, TAU, ALPHA = 4.0, 2.5, 0.5


def nag_model(model, negative, **settings):
    inputs = {"scale": PHI, "tau": TAU, "alpha": ALPHA, "layers": "auto", "start_percent": 0.0, "end_percent": 1.0}
    inputs.update(settings)
    return node("GuidersNAG", model=model, negative=negative, **inputs)


def _cond_rows(transformer_options, batch):
    tags = transformer_options["cond_or_uncond"]
    size = batch // len(tags)
    return [j * size + r for j, tag in enumerate(tags) if tag == 0 for r in range(size)]


# ---------------------------------------------------------------------------------------------------------
# LTX-2


def ltx_2_video_context(dm, negative_raw):
    """The video context LTX-2 makes of a processed text embedding, written here: the first caption_channels
    features (the video half), through caption_projection (the host projects after the connector on LTX-2.0)."""
    video_half = negative_raw[..., :dm.caption_channels]
    return dm.caption_projection(video_half)


def _ltx_2_video_cross_attention(module, video_context, options):
    heads = module.heads

    def forward(x, context=None, mask=None, pe=None, k_pe=None, transformer_options={}):  # noqa: B006
        assert mask is None  # the tiny LTX-2's conditioning has no text mask
        q = module.q_norm(module.to_q(x))
        z = softmax_attention(q, module.k_norm(module.to_k(context)), module.to_v(context), heads)
        rows = _cond_rows(transformer_options, x.shape[0])
        if rows:
            negative = video_context.to(x).expand(len(rows), -1, -1)
            z_neg = softmax_attention(q[rows], module.k_norm(module.to_k(negative)), module.to_v(negative), heads)
            z[rows] = paper_nag(z[rows], z_neg, PHI, TAU, ALPHA)
        options["seen"] += 1
        return module.to_out(z.to(x.dtype))

    return forward


@pytest.mark.parametrize("cfg", [1.0, 5.0])
def test_nag_on_ltx_2_matches_the_paper(guiders_pack, tiny_model, cfg):
    """LTX-2: NAG in every block's video attn2 (the audio's text attention untouched) equals the paper's
    equations on the host's modules, at cfg 1 (one call of 1 per step) and with CFG (one call of 2). Catches
    every break in the module docstring."""
    model = tiny_model("ltxav")
    negative = negative_of("ltxav")
    with ForwardCounter(model) as counter:
        ours = run_ltx2(nag_model(model, negative), "ltxav", cfg=cfg)
    assert counter.per_step() == [[1 if cfg == 1.0 else 2]] * 4
    plain = run_ltx2(model, "ltxav", cfg=cfg)
    dm = model.model.diffusion_model
    video_context = ltx_2_video_context(dm, negative[0][0])
    options = {"seen": 0}
    replaced = [block.attn2 for block in dm.transformer_blocks]
    for module in replaced:
        module.forward = _ltx_2_video_cross_attention(module, video_context, options)
    try:
        reference = run_ltx2(model, "ltxav", cfg=cfg)
    finally:
        for module in replaced:
            del module.forward
    assert options["seen"] == 4 * len(replaced)
    assert_av_parity(ours, reference, plain)


def test_nag_on_ltx_2_refuses_ltx_2_3_and_a_foreign_negative(guiders_pack, tiny_model):
    """LTX-2.3's cross-attention AdaLN (0.33.0) is refused with the reason; a negative of the wrong width
    (another family's encoder) is refused naming the widths the model takes."""
    model = tiny_model("ltxav")
    with pytest.raises(GuidanceError, match=r"GuidersNAG: negative has 32 features per token, this LTX-2 model's "
                                            r"text input takes 64"):
        nag_model(model, negative_of("wan"))
    if not host_has_ltx_2_3():
        return
    with pytest.raises(GuidanceError, match=r"GuidersNAG: this LTX-2 model has cross-attention AdaLN \(the "
                                            r"LTX-2.3 config\)"):
        nag_model(tiny_model("ltxav_2_3"), negative_of("ltxav"))


def test_nag_on_ltx_2_leaves_the_audio_text_attention_alone(guiders_pack, tiny_model):
    """What reaches audio_attn2 with NAG on is what reaches it without NAG in the first block (its input does
    not depend on the video's text attention there), and no NAG runs inside it. Catches: NAG in audio_attn2."""
    model = tiny_model("ltxav")
    dm = model.model.diffusion_model
    outputs = {}

    def record(key):
        def hook(module, args, output):
            outputs.setdefault(key, output.detach().clone())
        return hook

    for key, m in (("plain", model), ("nag", nag_model(model, negative_of("ltxav")))):
        handle = dm.transformer_blocks[0].audio_attn2.register_forward_hook(record(key))
        try:
            run_ltx2(m, "ltxav", cfg=1.0)
        finally:
            handle.remove()
    assert torch.equal(outputs["plain"], outputs["nag"])


# ---------------------------------------------------------------------------------------------------------
# Next to ComfyUI's own NAGuidance (ComfyUI 0.33.0; comfy_extras/nodes_nag.py)


def _their_nag(model, scale=5.0, alpha=0.5, tau=1.5):
    return node("NAGuidance", model=model, nag_scale=scale, nag_alpha=alpha, nag_tau=tau)


@pytest.mark.parametrize("order", ["ours_then_theirs", "theirs_then_ours"])
@pytest.mark.parametrize("cfg", [1.0, 5.0])
def test_nag_next_to_comfyuis_naguidance(guiders_pack, tiny_model, comfy_host, order, cfg):
    """ComfyUI's NAGuidance (0.33.0) is another method on another site (reference doc §1.7): the sampler's CFG
    negative as the negative, in the UNet's attn1 OUTPUT (self-attention, after to_out), and it forces the
    uncond pass at cfg 1. Ours acts in attn2 (cross-attention) with its own negative, on the cond rows. The two
    compose: either order equals their node on the unpatched model sampled with the paper's NAG written here
    in every attn2 (test_nag.reference_nag), at cfg 1 (one call of 2 per step: theirs forces the uncond) and 5.
    Catches: our NAG dropped or theirs dropped when both are on (each changes the result on its own); our NAG
    on the uncond rows their node forces in at cfg 1."""
    import nodes as comfy_nodes

    if "NAGuidance" not in comfy_nodes.NODE_CLASS_MAPPINGS:
        pytest.skip("this ComfyUI has no NAGuidance node (added after 0.8.0: comfy_extras/nodes_nag.py)")
    from test_nag import reference_nag

    model = tiny_model("sd15")
    negative = negative_of("sd15")
    if order == "ours_then_theirs":
        both = _their_nag(nag_model(model, negative))
    else:
        both = nag_model(_their_nag(model), negative)
    with ForwardCounter(model) as counter:
        ours = sample_family(both, "sd15", cfg=cfg)
    assert counter.per_step() == [[2]] * 4
    theirs_only = sample_family(_their_nag(model), "sd15", cfg=cfg)
    with reference_nag(model, "sd15", negative, PHI, TAU, ALPHA):
        reference = sample_family(_their_nag(model), "sd15", cfg=cfg)
    assert_parity(ours, reference, theirs_only)
    assert relative_error(ours, sample_family(nag_model(model, negative), "sd15", cfg=cfg)) > 1e-3


# ---------------------------------------------------------------------------------------------------------
# NAG + PAG in one step: PAG's branch from cond gets NAG too


@pytest.mark.parametrize("family", ("pixart", "ltxv", "cosmos_predict2"))
def test_nag_with_pag_batched_equals_sequential_on_more_families(guiders_pack, tiny_model, family):
    """NAG under PAG at cfg 5 on the output-projection sites (PixArt, Cosmos Predict 2: module hooks for both)
    and LTXV (override for both): one call of 3 per step when batched, and the same result as one call per
    branch, in either node order; both act (the result differs from PAG alone and from NAG alone). Catches:
    NAG's rows taken from a fixed position (the chunk order differs between layouts). That NAG reaches PAG's
    branch at all is checked by value in test_nag_reaches_pags_perturbed_branch."""
    model = tiny_model(family)
    negative = negative_of(family)
    size = LATENT_SIZE.get(family, {})

    def chain(mode, nag_first=True):
        if nag_first:
            return node("GuidersPAG", model=nag_model(model, negative), scale=2.0, branch_mode=mode)
        return nag_model(node("GuidersPAG", model=model, scale=2.0, branch_mode=mode), negative)

    with ForwardCounter(model) as counter:
        batched = sample_family(chain("batched"), family, cfg=5.0, **size)
    assert counter.per_step() == [[3]] * 4
    sequential = sample_family(chain("sequential"), family, cfg=5.0, **size)
    assert relative_error(sequential, batched) < 1e-5
    assert relative_error(sample_family(chain("batched", nag_first=False), family, cfg=5.0, **size), batched) < 1e-5
    assert relative_error(batched, sample_family(node("GuidersPAG", model=model, scale=2.0), family, cfg=5.0,
                                                 **size)) > 1e-2
    assert relative_error(batched, sample_family(nag_model(model, negative), family, cfg=5.0, **size)) > 1e-2


@pytest.mark.parametrize("cfg", [1.0, 5.0])
def test_nag_reaches_pags_perturbed_branch(guiders_pack, tiny_model, cfg):
    """PAG's perturbed branch is the cond branch perturbed, so NAG acts in it too (PAG's term then compares like
    with like): GuidersPAG over GuidersNAG equals ComfyUI's own PerturbedAttentionGuidance (its separate
    perturbed cond pass, tagged cond) sampled with the paper's NAG written here in every attn2 of every pass
    (test_nag.reference_nag). Catches: NAG on the cond chunk only (``_positive_rows`` without PAG's branch)."""
    from test_nag import reference_nag

    model = tiny_model("sd15")
    negative = negative_of("sd15")
    ours = sample_family(node("GuidersPAG", model=nag_model(model, negative), scale=2.0), "sd15", cfg=cfg)
    comfy_pag = node("PerturbedAttentionGuidance", model=model, scale=2.0)
    pag_only = sample_family(comfy_pag, "sd15", cfg=cfg)
    with reference_nag(model, "sd15", negative, PHI, TAU, ALPHA):
        reference = sample_family(comfy_pag, "sd15", cfg=cfg)
    assert_parity(ours, reference, pag_only)
