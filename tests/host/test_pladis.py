"""GuidersPLADIS (Kim & Sim, ICCV 2025, arXiv:2503.07677) on the cross-attention families, through ComfyUI's real
KSampler on tiny random-weight models: SD1.5 and SDXL (UNet ``attn2``), Wan 2.1 (every block's ``cross_attn``),
LTXV (every block's ``attn2``, with its text mask); in their own tests LTX-2 (the video ``attn2``), Wan I2V (the
text call after the CLIP image tokens' one) and PLADIS with GuidersNAG (both node orders).

The reference is written here from the paper's equations and the host's own modules, never through the pack's
hooks: during a reference pass of the UNPATCHED model, each text cross-attention module's ``forward`` is replaced
(an instance attribute, removed afterwards) by one that projects q, k, v with the module's own layers, computes
the scores S = QKᵀ/√d (+ the text mask's bias) in float64, A_softmax = softmax(S), A_sparse = α-entmax(S) by a
bisection on its threshold written here (``p = [(α − 1)S − τ]_+^{1/(α−1)}``, Σp = 1; Peters et al. 2019 Eq. 9),
A = A_softmax + λ(A_sparse − A_softmax) (PLADIS Eq. 7), on every row, then A·V and the module's output projection.

Breaks tried, each fails ``test_pladis_matches_the_paper_through_sampling``:
- the sign of the extrapolation flipped in guidance_core/pladis.py (``dense - scale * (sparse - dense)``);
- sparsemax at α = 1.5 (``entmax`` dispatch): fails the α 1.5 cases;
- LTXV: the text mask not added to the sparse scores (``_score_bias`` returning None);
- the window ignored: fails ``test_pladis_window_is_respected``; ``layers`` ignored (every layer): fails
  ``test_pladis_layers_choose_the_cross_attentions``.
"""

from __future__ import annotations

import contextlib
import math

import pytest
import torch
from harness import ForwardCounter, assert_window_is_partial, run_node
from support import assert_parity, node, relative_error, sample_family

PLADIS_FAMILIES = ("sd15", "sdxl", "wan", "ltxv")


def paper_entmax(scores: torch.Tensor, alpha: float) -> torch.Tensor:
    """α-entmax over the last dim, float64, from its definition: the threshold τ with Σ[(α−1)s − τ]_+^{1/(α−1)} = 1
    found by bisection (the sum falls as τ rises), 200 halvings."""
    z = scores.double() * (alpha - 1)
    low, high = z.amax(-1, keepdim=True) - 1, z.amax(-1, keepdim=True)
    for _ in range(200):
        tau = (low + high) / 2
        above = (z - tau).clamp_min(0).pow(1 / (alpha - 1)).sum(-1, keepdim=True) >= 1
        low, high = torch.where(above, tau, low), torch.where(above, high, tau)
    p = (z - (low + high) / 2).clamp_min(0).pow(1 / (alpha - 1))
    return p / p.sum(-1, keepdim=True)


def pladis_attention(q, k, v, heads, scale, alpha, bias=None):
    """PLADIS Eq. 7 per head: (softmax(S) + λ(α-entmax(S) − softmax(S)))·V, (B, L, heads·D) in and out."""
    b, lq, inner = q.shape
    d = inner // heads
    qh, kh, vh = (t.reshape(t.shape[0], t.shape[1], heads, d).transpose(1, 2).double() for t in (q, k, v))
    scores = qh @ kh.transpose(-1, -2) / math.sqrt(d)
    if bias is not None:
        scores = scores + bias.double().clamp_min(-1e9)
    dense = torch.softmax(scores, dim=-1)
    attention = dense + scale * (paper_entmax(scores, alpha) - dense)
    return (attention @ vh).transpose(1, 2).reshape(b, lq, inner)


def _unet(module, scale, alpha, active):
    def forward(x, context=None, value=None, mask=None, transformer_options={}):  # noqa: B006
        q, k, v = module.to_q(x), module.to_k(context), module.to_v(context)
        on = active(transformer_options)
        z = pladis_attention(q, k, v, module.heads, scale if on else 0.0, alpha)
        return module.to_out(z.to(x.dtype))

    return forward


def _wan(module, scale, alpha, active):
    def forward(x, context, transformer_options={}, **kwargs):  # noqa: B006
        q, k, v = module.norm_q(module.q(x)), module.norm_k(module.k(context)), module.v(context)
        z = pladis_attention(q, k, v, module.num_heads, scale if active(transformer_options) else 0.0, alpha)
        return module.o(z.to(x.dtype))

    return forward


def _ltxv(module, scale, alpha, active):
    assert getattr(module, "to_gate_logits", None) is None  # the tiny LTXV has no per-head gates

    def forward(x, context=None, mask=None, pe=None, k_pe=None, transformer_options={}):  # noqa: B006
        q = module.q_norm(module.to_q(x))
        k, v = module.k_norm(module.to_k(context)), module.to_v(context)
        z = pladis_attention(q, k, v, module.heads, scale if active(transformer_options) else 0.0, alpha, mask)
        return module.to_out(z.to(x.dtype))

    return forward


@contextlib.contextmanager
def reference_pladis(model, family, scale, alpha, sigma_window=None, only=None):
    """The paper's PLADIS in every text cross-attention of ``model`` (unpatched); ``sigma_window`` (σ_end, σ_start)
    or None; ``only``: a module-name prefix to restrict it to."""
    dm = model.model.diffusion_model

    def active(transformer_options):
        if sigma_window is None:
            return True
        sigma = float(transformer_options["sigmas"].flatten()[0])
        return sigma_window[0] <= sigma <= sigma_window[1]

    makers = {"sd15": (".attn2", _unet), "sdxl": (".attn2", _unet), "wan": (".cross_attn", _wan),
              "ltxv": (".attn2", _ltxv)}
    suffix, make = makers[family]
    replaced = []
    for name, module in dm.named_modules():
        if name.endswith(suffix) and (only is None or name.startswith(only)):
            module.forward = make(module, scale, alpha, active)
            replaced.append(module)
    assert replaced, f"no cross-attention found on {family}"
    try:
        yield
    finally:
        for module in replaced:
            del module.forward


def pladis_model(model, **settings):
    inputs = {"scale": 2.0, "alpha": 1.5, "layers": "auto", "start_percent": 0.0, "end_percent": 1.0}
    inputs.update(settings)
    return node("GuidersPLADIS", model=model, **inputs)


CASES = [pytest.param(family, cfg, alpha, id=f"{family}-cfg{cfg:g}-alpha{alpha:g}")
         for family in PLADIS_FAMILIES for cfg, alpha in ((5.0, 1.5), (1.0, 2.0))] + [
    pytest.param("sd15", 5.0, 1.3, id="sd15-cfg5-alpha1.3")]


@pytest.mark.parametrize(("family", "cfg", "alpha"), CASES)
def test_pladis_matches_the_paper_through_sampling(guiders_pack, tiny_model, family, cfg, alpha):
    """PLADIS at cfg 1 and with CFG (every row changed) equals the paper's equations in every text cross-attention
    of the host's own modules, at α 1.5 (entmax1.5), 2 (sparsemax) and 1.3 (bisection). Catches the breaks in the
    module docstring."""
    model = tiny_model(family)
    ours = sample_family(pladis_model(model, alpha=alpha, scale=2.0), family, cfg=cfg)
    plain = sample_family(model, family, cfg=cfg)
    with reference_pladis(model, family, 2.0, alpha):
        reference = sample_family(model, family, cfg=cfg)
    assert_parity(ours, reference, plain)


@pytest.mark.parametrize("family", ("sd15", "wan"))
def test_pladis_adds_no_model_call(guiders_pack, tiny_model, family):
    """No extra branch: one call of 1 per step at cfg 1, one call of 2 (cond + uncond) at cfg 5."""
    patched = pladis_model(tiny_model(family))
    with ForwardCounter(patched) as counter:
        sample_family(patched, family, cfg=1.0)
    assert counter.per_step() == [[1]] * 4
    with ForwardCounter(patched) as counter:
        sample_family(patched, family, cfg=5.0)
    assert counter.per_step() == [[2]] * 4


def test_pladis_window_is_respected(guiders_pack, tiny_model):
    """Outside start/end percent the step is plain: equal to the reference applying PLADIS only inside the σ
    window (both ends included). Catches: the window ignored."""
    model = tiny_model("sd15")
    start, end = 0.0, 0.5
    assert_window_is_partial(model, start, end, 4)
    sampling = model.get_model_object("model_sampling")
    window = (float(sampling.percent_to_sigma(end)), float(sampling.percent_to_sigma(start)))
    ours = sample_family(pladis_model(model, start_percent=start, end_percent=end), "sd15")
    plain = sample_family(model, "sd15")
    with reference_pladis(model, "sd15", 2.0, 1.5, sigma_window=window):
        reference = sample_family(model, "sd15")
    with reference_pladis(model, "sd15", 2.0, 1.5):
        everywhere = sample_family(model, "sd15")
    assert relative_error(reference, everywhere) > 1e-3  # the window changes the reference
    assert_parity(ours, reference, plain)


def test_pladis_schedule_drives_lambda(guiders_pack, tiny_model):
    """A schedule replaces the scale widget: a custom list 2, 0, 0, 0 equals the reference applying λ 2 in the
    first step only; λ 0 is the plain model exactly."""
    model = tiny_model("sd15")
    plain = sample_family(model, "sd15")
    assert torch.equal(sample_family(pladis_model(model, scale=0.0), "sd15"), plain)
    first_only = node("GuidersScheduleCustom", values="2, 0, 0, 0")
    ours = sample_family(pladis_model(model, scale=9.0, schedule=first_only), "sd15")
    sigmas = run_node("BasicScheduler", model=model, scheduler="normal", steps=4, denoise=1.0)[0]
    first = (float(sigmas[1]) * 1.001, float(sigmas[0]) * 1.001)  # only σ₀ lies inside
    with reference_pladis(model, "sd15", 2.0, 1.5, sigma_window=first):
        reference = sample_family(model, "sd15")
    assert_parity(ours, reference, plain)


def test_pladis_layers_choose_the_cross_attentions(guiders_pack, tiny_model):
    """An explicit layer list changes only those layers: the middle block alone equals the reference applied in
    the middle block's cross-attention only."""
    model = tiny_model("sd15")
    ours = sample_family(pladis_model(model, layers="middle"), "sd15")
    plain = sample_family(model, "sd15")
    with reference_pladis(model, "sd15", 2.0, 1.5, only="middle_block"):
        reference = sample_family(model, "sd15")
    assert_parity(ours, reference, plain)


@pytest.mark.parametrize("family", ("flux", "pixart"))
def test_pladis_refuses_families_whose_attention_map_it_cannot_see(guiders_pack, tiny_model, family):
    with pytest.raises(ValueError, match=r"GuidersPLADIS: .*is not supported; GuidersPLADIS supports UNet"):
        pladis_model(tiny_model(family))


def _unet_pladis_nag(module, negative_raw, scale, alpha, nag):
    """UNet attn2 with PLADIS as its attention function and NAG on the cond rows: Z⁺ = PLADIS(q, k⁺, v⁺) on
    every row, Z⁻ = PLADIS(q_cond, k⁻, v⁻), the cond rows NAG(Z⁺, Z⁻) (test_nag.paper_nag)."""
    from test_nag import _cond_rows, paper_nag

    def forward(x, context=None, value=None, mask=None, transformer_options={}):  # noqa: B006
        q, k, v = module.to_q(x), module.to_k(context), module.to_v(context)
        z = pladis_attention(q, k, v, module.heads, scale, alpha)
        rows = _cond_rows(transformer_options, x.shape[0])
        if rows:
            negative = negative_raw.to(x).expand(len(rows), -1, -1)
            z_neg = pladis_attention(q[rows], module.to_k(negative), module.to_v(negative), module.heads, scale, alpha)
            z[rows] = paper_nag(z[rows], z_neg, *nag)
        return module.to_out(z.to(x.dtype))

    return forward


def _wan_pladis_nag(module, embed, negative_raw, scale, alpha, nag):
    from test_nag import _cond_rows, paper_nag

    def forward(x, context, transformer_options={}, **kwargs):  # noqa: B006
        q, k, v = module.norm_q(module.q(x)), module.norm_k(module.k(context)), module.v(context)
        z = pladis_attention(q, k, v, module.num_heads, scale, alpha)
        rows = _cond_rows(transformer_options, x.shape[0])
        if rows:
            negative = embed(negative_raw.to(x).expand(len(rows), -1, -1))
            z_neg = pladis_attention(q[rows], module.norm_k(module.k(negative)), module.v(negative), module.num_heads,
                                     scale, alpha)
            z[rows] = paper_nag(z[rows], z_neg, *nag)
        return module.o(z.to(x.dtype))

    return forward


@pytest.mark.parametrize(("family", "cfg", "pladis_first"), [("sd15", 5.0, True), ("sd15", 5.0, False),
                                                              ("wan", 1.0, False)])
def test_pladis_and_nag_compose_as_one_attention_function(guiders_pack, tiny_model, family, cfg, pladis_first):
    """PLADIS with GuidersNAG on the same model, in either node order: PLADIS changes the attention function, so
    NAG's Z⁺ (every row) and Z⁻ (the cond rows, the negative's keys and values) are both PLADIS attentions, then
    NAG combines them. Breaks tried: the repeat mark dropped in nodes/host/nag.py (Z⁻ dense when NAG's override
    wraps PLADIS's: fails PLADIS-first); ``previous`` handed ``func`` instead of the PLADIS function (Z⁺ − Z⁻
    computed densely, PLADIS only around NAG's result: fails NAG-first)."""
    from test_nag import nag_model, negative_of

    model = tiny_model(family)
    negative = negative_of(family)
    phi, tau, nag_alpha, scale, alpha = 4.0, 2.5, 0.5, 2.0, 1.5
    if pladis_first:
        patched = nag_model(pladis_model(model, scale=scale, alpha=alpha), negative, scale=phi, tau=tau,
                            alpha=nag_alpha)
    else:
        patched = pladis_model(nag_model(model, negative, scale=phi, tau=tau, alpha=nag_alpha), scale=scale,
                               alpha=alpha)
    ours = sample_family(patched, family, cfg=cfg)
    plain = sample_family(model, family, cfg=cfg)
    dm = model.model.diffusion_model
    suffix = ".attn2" if family == "sd15" else ".cross_attn"
    replaced = [module for name, module in dm.named_modules() if name.endswith(suffix)]
    for module in replaced:
        if family == "sd15":
            module.forward = _unet_pladis_nag(module, negative[0][0], scale, alpha, (phi, tau, nag_alpha))
        else:
            module.forward = _wan_pladis_nag(module, dm.text_embedding, negative[0][0], scale, alpha,
                                             (phi, tau, nag_alpha))
    try:
        reference = sample_family(model, family, cfg=cfg)
    finally:
        for module in replaced:
            del module.forward
    with reference_pladis(model, family, scale, alpha):
        pladis_alone = sample_family(model, family, cfg=cfg)
    assert relative_error(reference, pladis_alone) > 1e-3  # NAG changes the reference
    assert_parity(ours, reference, plain)


def _ltx_2_video_text_attention(module, scale, alpha):
    """LTX-2's video attn2 (comfy/ldm/lightricks/model.py CrossAttention.forward, called by av_model.py
    _apply_text_cross_attention on inputs already modulated on LTX-2.3): q_norm(to_q(x)), k_norm(to_k(c)),
    to_v(c), PLADIS with the text mask, LTX-2.3's per-head gates 2σ(to_gate_logits(x)) on the result, to_out."""
    def forward(x, context=None, mask=None, pe=None, k_pe=None, transformer_options={}):  # noqa: B006
        assert pe is None and context is not None  # the text cross-attention: no rope
        q = module.q_norm(module.to_q(x))
        k, v = module.k_norm(module.to_k(context)), module.to_v(context)
        z = pladis_attention(q, k, v, module.heads, scale, alpha, mask).to(x.dtype)
        if getattr(module, "to_gate_logits", None) is not None:
            gates = 2.0 * torch.sigmoid(module.to_gate_logits(x))
            z = (z.view(*z.shape[:2], module.heads, -1) * gates.unsqueeze(-1)).flatten(2)
        return module.to_out(z)

    return forward


def _ltx_2_configs():
    from test_family_ltx2 import PER_CONFIG

    return PER_CONFIG


@_ltx_2_configs()
def test_pladis_on_ltx_2_changes_the_video_text_attention_only(guiders_pack, tiny_model, family):
    """LTX-2 (and its 2.3 config: cross-attention AdaLN, gated attention): PLADIS in every block's video ``attn2``
    equals the paper's equations there, ``audio_attn2`` (the audio's text attention) and the audio↔video
    attentions left dense. Break tried: the site's attribute ``audio_attn2`` instead of ``attn2`` (nodes/host/
    families.py NAG_SITES["ltxav"]): both configs fail. (The text mask dropped from the sparse scores does not
    fail here: the tiny LTX-2's prompt masks no token; the LTXV case of the parity test catches it.)"""
    from test_family_ltx2 import assert_parity as assert_ltx_2_parity
    from test_modality import run

    model = tiny_model(family)
    ours = run(pladis_model(model, scale=2.0, alpha=1.5), family, cfg=5.0)
    plain = run(model, family, cfg=5.0)
    dm = model.model.diffusion_model
    replaced = [module for name, module in dm.named_modules() if name.endswith(".attn2")]
    assert replaced and any(name.endswith(".audio_attn2") for name, _module in dm.named_modules())
    for module in replaced:
        module.forward = _ltx_2_video_text_attention(module, 2.0, 1.5)
    try:
        reference = run(model, family, cfg=5.0)
    finally:
        for module in replaced:
            del module.forward
    assert_ltx_2_parity(ours, reference, plain)


def _wan_i2v_text_attention(module, scale, alpha):
    """Wan I2V's cross_attn (comfy/ldm/wan/model.py WanI2VCrossAttention.forward): the CLIP image tokens' attention
    dense, the text's PLADIS, summed, then o."""
    from test_nag import softmax_attention

    def forward(x, context, context_img_len, transformer_options={}):  # noqa: B006
        image, text = context[:, :context_img_len], context[:, context_img_len:]
        q = module.norm_q(module.q(x))
        z_image = softmax_attention(q, module.norm_k_img(module.k_img(image)), module.v_img(image), module.num_heads)
        z_text = pladis_attention(q, module.norm_k(module.k(text)), module.v(text), module.num_heads, scale, alpha)
        return module.o((z_text + z_image).to(x.dtype))

    return forward


def test_pladis_on_wan_i2v_changes_the_text_attention_only(guiders_pack, comfy_host):
    """Wan 2.1 I2V: the module's second attention call (the text; the first attends to the CLIP image tokens) is
    PLADIS's, the image tokens' stays dense. Break tried: the text call index 0 (PLADIS on the image tokens'
    attention, nodes/host/families.py NAG_SITES["wan"])."""
    from harness import sample
    from tiny_models import make_latent, make_wan_i2v, wan_i2v_conditioning

    model = make_wan_i2v(seed=0)
    positive, negative = wan_i2v_conditioning(seed=1), wan_i2v_conditioning(seed=2)
    latent = make_latent("wan", h=16, w=16, seed=2)

    def run(m):
        return sample(m, positive, negative, latent, cfg=5.0, steps=4, seed=3)

    ours = run(pladis_model(model))
    plain = run(model)
    dm = model.model.diffusion_model
    replaced = [m for n, m in dm.named_modules() if n.endswith(".cross_attn")]
    assert replaced and all(type(m).__name__ == "WanI2VCrossAttention" for m in replaced)
    for module in replaced:
        module.forward = _wan_i2v_text_attention(module, 2.0, 1.5)
    try:
        reference = run(model)
    finally:
        for module in replaced:
            del module.forward
    assert_parity(ours, reference, plain)
