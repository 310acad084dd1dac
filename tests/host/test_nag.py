"""GuidersNAG (Normalized Attention Guidance, Chen et al. 2025, arXiv:2505.21179) on the cross-attention families,
through ComfyUI's real KSampler on tiny random-weight models: SD1.5 and SDXL (UNet ``attn2``), Wan 2.1 (every
block's ``cross_attn``; text-to-video, and image-to-video where it attends to the CLIP image tokens first),
LTXV (every block's ``attn2``, with the T5 text mask) and PixArt-Σ (every block's ``cross_attn``, whose attention
call no override sees: NAG at its output projection's input, keys and values from one fused ``kv_linear``) and
Cosmos Predict 2 (every block's ``cross_attn``, heads-split with per-head q/k norms: NAG at ``output_proj``'s
input); and in their own tests Anima (the negative through its LLM adapter), Kandinsky 5 (the negative through
its text blocks at the call's t) and HunyuanDiT (``attn2``, the negative made into the model's text states).

The reference is written here from the paper's equations and the host's own modules, never through the pack's
hooks: during a reference pass of the UNPATCHED model, each text cross-attention module's ``forward`` is
replaced (an instance attribute, removed afterwards) by one that projects q from its input and k, v from the
positive context and from the negative context (Wan: the negative through the model's own ``text_embedding``;
LTXV: through ``caption_projection``, its own mask through the model's ``_prepare_attention_mask``; PixArt:
through ``y_embedder``)
with the module's own layers, computes both attentions with a softmax written here, combines them per token in
float64 by Z̃ = Z⁺ + φ(Z⁺ − Z⁻), r = ‖Z̃‖₁/‖Z⁺‖₁, Ẑ = Z̃·min(r, τ)/r, α·Ẑ + (1 − α)·Z⁺ on the cond rows only
(``cond_or_uncond`` tag 0; the uncond rows keep Z⁺), and applies the module's output projection.

Breaks tried, each fails ``test_nag_matches_the_paper_through_sampling`` (and the window test where it says):
- Z⁺ and Z⁻ swapped in nodes/host/nag.py (``nag_combine(z_neg, z_pos, ...)``);
- the τ cap dropped in guidance_core/nag.py (``ratio.clamp(max=tau)`` → ``ratio``);
- NAG in self-attention instead of cross-attention (the UNet site's ``attribute`` "attn1");
- NAG on every row (uncond too): fails the cfg 5 cases;
- the window ignored (``_in_window`` always true): fails ``test_nag_window_is_respected``;
- LTXV: the negative's own text mask not applied, or the negative not passed through ``caption_projection``;
- PixArt: Z⁺ and Z⁻ swapped in the output-projection hook; the fused ``kv_linear`` halves read as values then
  keys;
- Cosmos Predict 2: NAG in ``self_attn`` instead of ``cross_attn`` (the site's attribute); the negative's keys
  without the per-head ``k_norm``;
- Wan I2V: the text call index 0 (NAG on the CLIP image tokens' attention): fails
  ``test_nag_on_wan_i2v_guides_the_text_attention_only``.
"""

from __future__ import annotations

import contextlib
import math

import pytest
import torch
from harness import ForwardCounter, assert_window_is_partial, run_node, sample
from support import assert_parity, node, relative_error, sample_family
from tiny_models import host_lacks, make_conditioning, make_latent, make_wan_i2v, wan_i2v_conditioning

GuidanceError = ValueError  # the pack's GuidanceError is a ValueError (nodes/host/marks.py)

NAG_FAMILIES = ("sd15", "sdxl", "wan", "ltxv", "pixart", "cosmos_predict2")


# PixArt's position embedding needs a latent of at least 32 (its base size is round(side / 64)·64 / patch).
LATENT_SIZE = {"pixart": {"h": 32, "w": 40}}


def sample_nag(model, family: str, cfg: float):
    return sample_family(model, family, cfg=cfg, **LATENT_SIZE.get(family, {}))


def negative_of(family: str):
    """A NAG negative for ``family``: a conditioning drawn apart from sample_family's prompts (seed 1)."""
    return make_conditioning(family, seed=11)[0]


def softmax_attention(q, k, v, heads, bias=None):
    """Scaled dot-product attention per head, written here: (B, L, heads·D) in and out; ``bias`` is added to
    the logits (LTXV's text mask, (B, 1, 1, L))."""
    b, lq, inner = q.shape
    d = inner // heads
    qh, kh, vh = (t.reshape(t.shape[0], t.shape[1], heads, d).transpose(1, 2).double() for t in (q, k, v))
    logits = qh @ kh.transpose(-1, -2) / math.sqrt(d)
    weights = torch.softmax(logits if bias is None else logits + bias.double(), dim=-1)
    return (weights @ vh).transpose(1, 2).reshape(b, lq, inner)


def paper_nag(z_pos, z_neg, phi, tau, alpha):
    """arXiv:2505.21179 §3, per token over the features, float64."""
    z_tilde = z_pos + phi * (z_pos - z_neg)
    ratio = z_tilde.abs().sum(-1, keepdim=True) / z_pos.abs().sum(-1, keepdim=True)
    z_hat = z_tilde * torch.minimum(ratio, torch.full_like(ratio, tau)) / ratio
    return alpha * z_hat + (1 - alpha) * z_pos


def _cond_rows(transformer_options, batch):
    tags = transformer_options["cond_or_uncond"]
    size = batch // len(tags)
    return [j * size + r for j, tag in enumerate(tags) if tag == 0 for r in range(size)]


def _unet_cross_attention(module, negative_raw, phi, tau, alpha, active):
    heads = module.heads

    def forward(x, context=None, value=None, mask=None, transformer_options={}):  # noqa: B006
        q, k, v = module.to_q(x), module.to_k(context), module.to_v(context)
        z = softmax_attention(q, k, v, heads)
        rows = _cond_rows(transformer_options, x.shape[0])
        if active(transformer_options) and rows:
            negative = negative_raw.to(x).expand(len(rows), -1, -1)
            z_neg = softmax_attention(q[rows], module.to_k(negative), module.to_v(negative), heads)
            z[rows] = paper_nag(z[rows], z_neg, phi, tau, alpha)
        return module.to_out(z.to(x.dtype))

    return forward


def _wan_cross_attention(module, embed, negative_raw, phi, tau, alpha, active):
    heads = module.num_heads

    def forward(x, context, transformer_options={}, **kwargs):  # noqa: B006
        q, k, v = module.norm_q(module.q(x)), module.norm_k(module.k(context)), module.v(context)
        z = softmax_attention(q, k, v, heads)
        rows = _cond_rows(transformer_options, x.shape[0])
        if active(transformer_options) and rows:
            negative = embed(negative_raw.to(x).expand(len(rows), -1, -1))
            z_neg = softmax_attention(q[rows], module.norm_k(module.k(negative)), module.v(negative), heads)
            z[rows] = paper_nag(z[rows], z_neg, phi, tau, alpha)
        return module.o(z.to(x.dtype))

    return forward


def _ltxv_cross_attention(module, dm, negative, phi, tau, alpha, active):
    """LTXV's attn2: q_norm(to_q(x)), k_norm(to_k(c)), to_v(c), the text mask as a logit bias; the negative
    through caption_projection, its own mask through the model's _prepare_attention_mask."""
    heads = module.heads
    negative_raw, negative_mask = negative[0][0], negative[0][1]["attention_mask"]
    assert getattr(module, "to_gate_logits", None) is None  # the tiny LTXV has no per-head gates

    def forward(x, context=None, mask=None, pe=None, k_pe=None, transformer_options={}):  # noqa: B006
        q = module.q_norm(module.to_q(x))
        k, v = module.k_norm(module.to_k(context)), module.to_v(context)
        z = softmax_attention(q, k, v, heads, mask)
        rows = _cond_rows(transformer_options, x.shape[0])
        if active(transformer_options) and rows:
            embedded = dm.caption_projection(negative_raw.to(x).expand(len(rows), -1, -1))
            bias = dm._prepare_attention_mask(negative_mask.expand(len(rows), -1), x.dtype)
            z_neg = softmax_attention(q[rows], module.k_norm(module.to_k(embedded)), module.to_v(embedded), heads,
                                      bias)
            z[rows] = paper_nag(z[rows], z_neg, phi, tau, alpha)
        return module.to_out(z.to(x.dtype))

    return forward


def _pixart_cross_attention(module, dm, negative_raw, phi, tau, alpha, active):
    """PixArt's cross_attn: q_linear(x), kv_linear(c) viewed as (2, heads, head_dim) (keys, then values), no mask,
    proj; the negative through the model's own y_embedder (as PixArtMS.forward: (N, 1, L, C) in)."""
    heads = module.num_heads

    def keys_values(context):
        kv = module.kv_linear(context).view(context.shape[0], context.shape[1], 2, -1)
        return kv[:, :, 0], kv[:, :, 1]

    def forward(x, cond, mask=None):
        q = module.q_linear(x)
        k, v = keys_values(cond.view(x.shape[0], -1, cond.shape[-1]))  # the host's (1, B·L, D) text, per row
        z = softmax_attention(q, k, v, heads)
        rows = _cond_rows(dm.nag_reference_options, x.shape[0])
        if active(dm.nag_reference_options) and rows:
            embedded = dm.y_embedder(negative_raw.to(x).expand(len(rows), -1, -1).unsqueeze(1), False).squeeze(1)
            z_neg = softmax_attention(q[rows], *keys_values(embedded), heads)
            z[rows] = paper_nag(z[rows], z_neg, phi, tau, alpha)
        return module.proj(z.to(x.dtype))

    return forward


def _cosmos_cross_attention(module, dm, negative_raw, phi, tau, alpha, active):
    """Cosmos Predict 2's cross_attn: q_norm(q_proj(x)) and k_norm(k_proj(c)) per head (RMSNorm over head_dim),
    v_proj(c), no rope (self-attention only), output_proj; the negative as the encoder gave it."""
    heads, head_dim = module.n_heads, module.head_dim

    def per_head(t, norm):
        return norm(t.view(t.shape[0], t.shape[1], heads, head_dim)).flatten(2)

    def forward(x, context=None, rope_emb=None, transformer_options={}):  # noqa: B006
        q = per_head(module.q_proj(x), module.q_norm)
        k, v = per_head(module.k_proj(context), module.k_norm), module.v_proj(context)
        z = softmax_attention(q, k, v, heads)
        rows = _cond_rows(dm.nag_reference_options, x.shape[0])
        if active(dm.nag_reference_options) and rows:
            negative = negative_raw.to(x).expand(len(rows), -1, -1)
            z_neg = softmax_attention(q[rows], per_head(module.k_proj(negative), module.k_norm),
                                      module.v_proj(negative), heads)
            z[rows] = paper_nag(z[rows], z_neg, phi, tau, alpha)
        return module.output_proj(z.to(x.dtype))

    return forward


def _remember_options(dm):
    """PixArt's blocks get no transformer_options (Cosmos' on 0.8.0 neither): the reference reads the call's from
    the model's forward."""
    def remember(module, args, kwargs):
        dm.nag_reference_options = kwargs["transformer_options"]

    return dm.register_forward_pre_hook(remember, with_kwargs=True)


@contextlib.contextmanager
def reference_nag(model, family, negative, phi, tau, alpha, sigma_window=None):
    """The paper's NAG on ``model`` (unpatched) while the block runs; ``sigma_window`` (σ_end, σ_start) or None."""
    dm = model.model.diffusion_model
    context = negative[0][0]

    def active(transformer_options):
        if sigma_window is None:
            return True
        sigma = float(transformer_options["sigmas"].flatten()[0])
        return sigma_window[0] <= sigma <= sigma_window[1]

    replaced = []
    for name, module in dm.named_modules():
        if family in ("sd15", "sdxl") and name.endswith(".attn2"):
            module.forward = _unet_cross_attention(module, context, phi, tau, alpha, active)
        elif family == "wan" and name.endswith(".cross_attn"):
            module.forward = _wan_cross_attention(module, dm.text_embedding, context, phi, tau, alpha, active)
        elif family == "ltxv" and name.endswith(".attn2"):
            module.forward = _ltxv_cross_attention(module, dm, negative, phi, tau, alpha, active)
        elif family == "pixart" and name.endswith(".cross_attn"):
            module.forward = _pixart_cross_attention(module, dm, context, phi, tau, alpha, active)
        elif family in ("cosmos_predict2", "anima") and name.endswith(".cross_attn"):
            module.forward = _cosmos_cross_attention(module, dm, context, phi, tau, alpha, active)
        else:
            continue
        replaced.append(module)
    assert replaced, f"no cross-attention found on {family}"
    handle = _remember_options(dm) if family in ("pixart", "cosmos_predict2", "anima") else None
    try:
        yield
    finally:
        for module in replaced:
            del module.forward
        if handle is not None:
            handle.remove()


def nag_model(model, negative, **settings):
    inputs = {"scale": 4.0, "tau": 2.5, "alpha": 0.5, "layers": "auto", "start_percent": 0.0, "end_percent": 1.0}
    inputs.update(settings)
    return node("GuidersNAG", model=model, negative=negative, **inputs)


@pytest.mark.parametrize("family", NAG_FAMILIES)
@pytest.mark.parametrize(("cfg", "tau"), [(1.0, 2.5), (5.0, 2.5), (1.0, 1.5), (5.0, 1.5)])
def test_nag_matches_the_paper_through_sampling(guiders_pack, tiny_model, family, cfg, tau):
    """NAG at cfg 1 (cond only) and with CFG (the uncond untouched) equals the paper's equations applied in
    every text cross-attention of the host's own modules. Catches every break in the module docstring."""
    model = tiny_model(family)
    negative = negative_of(family)
    phi, alpha = 4.0, 0.5
    ours = sample_nag(nag_model(model, negative, tau=tau, alpha=alpha, scale=phi), family, cfg)
    plain = sample_nag(model, family, cfg)
    with reference_nag(model, family, negative, phi, tau, alpha):
        reference = sample_nag(model, family, cfg)
    assert_parity(ours, reference, plain)


@pytest.mark.parametrize("family", ("sd15", "wan"))
def test_nag_window_is_respected(guiders_pack, tiny_model, family):
    """Outside start/end percent the step is plain: equal to the reference applying NAG only inside the σ
    window (host's percent_to_sigma, both ends included). Catches: the window ignored."""
    model = tiny_model(family)
    negative = negative_of(family)
    start, end, steps = 0.0, 0.5, 4
    assert_window_is_partial(model, start, end, steps)
    sampling = model.get_model_object("model_sampling")
    window = (float(sampling.percent_to_sigma(end)), float(sampling.percent_to_sigma(start)))
    ours = sample_family(nag_model(model, negative, start_percent=start, end_percent=end), family, cfg=1.0)
    plain = sample_family(model, family, cfg=1.0)
    with reference_nag(model, family, negative, 4.0, 2.5, 0.5, sigma_window=window):
        reference = sample_family(model, family, cfg=1.0)
    with reference_nag(model, family, negative, 4.0, 2.5, 0.5):
        everywhere = sample_family(model, family, cfg=1.0)
    assert relative_error(reference, everywhere) > 1e-3  # the window changes the reference
    assert_parity(ours, reference, plain)


@pytest.mark.parametrize("family", NAG_FAMILIES)
def test_nag_at_cfg_1_is_one_forward_of_batch_1_per_step(guiders_pack, tiny_model, family):
    """ComfyUI's cfg 1 shortcut still applies: one call per step, batch 1, the cond only. With cfg 5: one call
    of 2 per step (cond + uncond), no extra forward."""
    model = tiny_model(family)
    patched = nag_model(model, negative_of(family))
    with ForwardCounter(model) as counter:
        sample_nag(patched, family, 1.0)
    assert counter.per_step() == [[1]] * 4
    assert {call.cond_or_uncond for call in counter.calls} == {(0,)}
    with ForwardCounter(model) as counter:
        sample_nag(patched, family, 5.0)
    assert counter.per_step() == [[2]] * 4


def test_nag_identities(guiders_pack, tiny_model):
    """φ = 0 changes nothing; a negative equal to the positive prompt changes nothing (Z⁻ = Z⁺), as the formula
    says; a different negative does change the result."""
    model = tiny_model("sd15")
    plain = sample_family(model, "sd15", cfg=1.0)
    assert torch.equal(sample_family(nag_model(model, negative_of("sd15"), scale=0.0), "sd15", cfg=1.0), plain)
    positive = make_conditioning("sd15", seed=1)[0]  # sample_family's prompt
    same = sample_family(nag_model(model, positive), "sd15", cfg=1.0)
    assert relative_error(same, plain) < 1e-5
    assert relative_error(sample_family(nag_model(model, negative_of("sd15")), "sd15", cfg=1.0), plain) > 1e-2


def test_nag_schedule_drives_phi_per_step(guiders_pack, tiny_model):
    """A schedule replaces the scale widget: constant 4 equals scale 4; a custom list 4, 0, 0, 0 equals the
    reference applying φ 4 in the first step only (σ window of the first step). Catches: the schedule ignored,
    or read at the wrong step."""
    model = tiny_model("sd15")
    negative = negative_of("sd15")
    constant = node("GuidersScheduleConstant", value=4.0)
    by_widget = sample_family(nag_model(model, negative), "sd15", cfg=1.0)
    by_schedule = sample_family(nag_model(model, negative, scale=0.0, schedule=constant), "sd15", cfg=1.0)
    assert torch.equal(by_schedule, by_widget)
    first_only = node("GuidersScheduleCustom", values="4, 0, 0, 0")
    ours = sample_family(nag_model(model, negative, scale=9.0, schedule=first_only), "sd15", cfg=1.0)
    plain = sample_family(model, "sd15", cfg=1.0)
    sigmas = run_node("BasicScheduler", model=model, scheduler="normal", steps=4, denoise=1.0)[0]
    first = (float(sigmas[1]) * 1.001, float(sigmas[0]) * 1.001)  # only σ₀ lies inside
    with reference_nag(model, "sd15", negative, 4.0, 2.5, 0.5, sigma_window=first):
        reference = sample_family(model, "sd15", cfg=1.0)
    assert_parity(ours, reference, plain)


def test_nag_layers_choose_the_cross_attentions(guiders_pack, tiny_model):
    """An explicit layer list guides only those layers: the middle block alone differs from 'auto' and from
    plain, and equals the reference applied in the middle block's cross-attention only."""
    model = tiny_model("sd15")
    negative = negative_of("sd15")
    middle = sample_family(nag_model(model, negative, layers="middle"), "sd15", cfg=1.0)
    everywhere = sample_family(nag_model(model, negative), "sd15", cfg=1.0)
    plain = sample_family(model, "sd15", cfg=1.0)
    assert relative_error(middle, plain) > 1e-3 and relative_error(middle, everywhere) > 1e-3
    dm = model.model.diffusion_model
    context = negative[0][0]
    replaced = [m for n, m in dm.named_modules() if n.startswith("middle_block") and n.endswith(".attn2")]
    for module in replaced:
        module.forward = _unet_cross_attention(module, context, 4.0, 2.5, 0.5, lambda _options: True)
    try:
        reference = sample_family(model, "sd15", cfg=1.0)
    finally:
        for module in replaced:
            del module.forward
    assert relative_error(middle, reference) < 1e-4


def test_nag_stacks_with_pag_in_one_forward(guiders_pack, tiny_model):
    """NAG + PAG: still one forward per step (cond + PAG's perturbed branch at cfg 1), finite, and both act."""
    model = tiny_model("sd15")
    both = node("GuidersPAG", model=nag_model(model, negative_of("sd15")), scale=2.0)
    with ForwardCounter(model) as counter:
        result = sample_family(both, "sd15", cfg=1.0)
    assert counter.per_step() == [[2]] * 4
    pag_only = sample_family(node("GuidersPAG", model=model, scale=2.0), "sd15", cfg=1.0)
    assert torch.isfinite(result).all() and relative_error(result, pag_only) > 1e-2


@pytest.mark.parametrize("family", ("sd15", "wan"))
def test_nag_with_pag_batched_equals_sequential(guiders_pack, tiny_model, family):
    """NAG under PAG (on Wan this pack's DiT attention override and NAG's wrap each other), at cfg 5: one call
    of 3 per step when batched, and the same result as one call per branch (each chunk found by its tag in
    either layout), in either node order."""
    model = tiny_model(family)
    negative = negative_of(family)

    def chain(mode, nag_first=True):
        if nag_first:
            return node("GuidersPAG", model=nag_model(model, negative), scale=2.0, branch_mode=mode)
        return nag_model(node("GuidersPAG", model=model, scale=2.0, branch_mode=mode), negative)

    with ForwardCounter(model) as counter:
        batched = sample_family(chain("batched"), family, cfg=5.0)
    assert counter.per_step() == [[3]] * 4
    sequential = sample_family(chain("sequential"), family, cfg=5.0)
    assert relative_error(sequential, batched) < 1e-5
    assert relative_error(sample_family(chain("batched", nag_first=False), family, cfg=5.0), batched) < 1e-5
    pag_only = sample_family(node("GuidersPAG", model=model, scale=2.0), family, cfg=5.0)
    assert relative_error(batched, pag_only) > 1e-2


def _wan_i2v_cross_attention(module, embed, negative_raw, phi, tau, alpha):
    """WanI2VCrossAttention: the CLIP image tokens first (their attention untouched), then the text with NAG."""
    heads = module.num_heads

    def forward(x, context, context_img_len, transformer_options={}):  # noqa: B006
        context_img, text = context[:, :context_img_len], context[:, context_img_len:]
        q = module.norm_q(module.q(x))
        image_part = softmax_attention(q, module.norm_k_img(module.k_img(context_img)), module.v_img(context_img),
                                       heads)
        z = softmax_attention(q, module.norm_k(module.k(text)), module.v(text), heads)
        rows = _cond_rows(transformer_options, x.shape[0])
        if rows:
            negative = embed(negative_raw.to(x).expand(len(rows), -1, -1))
            z_neg = softmax_attention(q[rows], module.norm_k(module.k(negative)), module.v(negative), heads)
            z[rows] = paper_nag(z[rows], z_neg, phi, tau, alpha)
        return module.o((z + image_part).to(x.dtype))

    return forward


@pytest.mark.parametrize("cfg", [1.0, 5.0])
def test_nag_on_wan_i2v_guides_the_text_attention_only(guiders_pack, comfy_host, cfg):
    """Wan 2.1 I2V: the module's second attention call (the text; the first attends to the CLIP image tokens)
    is the one NAG guides. Catches: the text call index 0 (NAG on the image tokens' attention)."""
    model = make_wan_i2v(seed=0)
    positive, negative_cfg = wan_i2v_conditioning(seed=1), wan_i2v_conditioning(seed=2)
    negative = negative_of("wan")
    latent = make_latent("wan", h=16, w=16, seed=2)

    def run(m):
        return sample(m, positive, negative_cfg, latent, cfg=cfg, steps=4, seed=3)

    ours = run(nag_model(model, negative))
    plain = run(model)
    dm = model.model.diffusion_model
    replaced = [m for n, m in dm.named_modules() if n.endswith(".cross_attn")]
    assert replaced and all(type(m).__name__ == "WanI2VCrossAttention" for m in replaced)
    for module in replaced:
        module.forward = _wan_i2v_cross_attention(module, dm.text_embedding, negative[0][0], 4.0, 2.5, 0.5)
    try:
        reference = run(model)
    finally:
        for module in replaced:
            del module.forward
    assert_parity(ours, reference, plain)


def test_nag_under_another_nodes_attn2_replace_patch(guiders_pack, tiny_model):
    """An IPAdapter-style attn2 replace patch makes the host skip the attn2 module's forward; NAG wraps it for
    the forward. With a foreign patch that attends exactly as the host (and records that it ran, with the
    options of the rows it was given), NAG's result equals NAG without it, at cfg 1 and 5. Catches: the
    replace patch not wrapped (NAG silently off in those layers); their patch handed the whole batch's options
    with the cond rows alone."""
    import comfy.ldm.modules.attention as comfy_attention

    model = tiny_model("sd15")
    negative = negative_of("sd15")
    seen = []

    def foreign_attn2(q, k, v, extra_options):
        tags = tuple(extra_options["cond_or_uncond"])
        assert q.shape[0] % len(tags) == 0, f"{q.shape[0]} rows handed with the options of chunks {tags}"
        seen.append(tags)
        return comfy_attention.optimized_attention(q, k, v, extra_options["n_heads"])

    foreign = model.clone()
    dm = model.model.diffusion_model
    for name, _module in dm.named_modules():
        if name.endswith(".attn2"):
            layer = layer_of(name)
            foreign.set_model_attn2_replace(foreign_attn2, layer[0], layer[1], layer[2])
    for cfg in (1.0, 5.0):
        without = sample_family(nag_model(model, negative), "sd15", cfg=cfg)
        with_foreign = sample_family(nag_model(foreign, negative), "sd15", cfg=cfg)
        assert relative_error(with_foreign, without) < 1e-5
    assert (0,) in seen and (1, 0) in seen  # their patch saw the cond rows alone, and the full batch


def layer_of(name: str) -> tuple:
    """("input", 4, 0) for "input_blocks.4.1.transformer_blocks.0.attn2", as set_model_attn2_replace takes it."""
    parts = name.split(".")
    kind = {"input_blocks": "input", "middle_block": "middle", "output_blocks": "output"}[parts[0]]
    index = 0 if kind == "middle" else int(parts[1])
    return kind, index, int(parts[parts.index("transformer_blocks") + 1])


def test_nag_leaves_no_trace(guiders_pack, tiny_model):
    """The input model is unchanged (no NAG setup, no wrapper), and after sampling no hook is left on any
    module and no attention override in any options (they live for one forward)."""
    model = tiny_model("sd15")
    before = (dict(model.model_options.get("transformer_options", {})), repr(model.wrappers))
    patched = nag_model(model, negative_of("sd15"))
    assert (dict(model.model_options.get("transformer_options", {})), repr(model.wrappers)) == before
    sample_family(patched, "sd15", cfg=5.0)
    for module in model.model.diffusion_model.modules():
        assert not module._forward_hooks and not module._forward_pre_hooks, type(module).__name__
    assert "optimized_attention_override" not in patched.model_options.get("transformer_options", {})


def test_nag_refuses_bad_inputs(guiders_pack, tiny_model):
    sd15 = tiny_model("sd15")
    negative = negative_of("sd15")
    with pytest.raises(GuidanceError, match=r"GuidersNAG: HiDream has joint attention .* not implemented"):
        nag_model(tiny_model("hidream"), negative_of("hidream"))
    with pytest.raises(GuidanceError, match=r"GuidersNAG: this model's architecture \(HunyuanVideo\)|HunyuanVideo has "
                                            "joint attention"):
        nag_model(tiny_model("hunyuan_video"), negative_of("hunyuan_video"))
    with pytest.raises(GuidanceError, match="scale must be a finite number"):
        nag_model(sd15, negative, scale=float("nan"))
    with pytest.raises(GuidanceError, match="tau"):
        nag_model(sd15, negative, tau=0.5)
    with pytest.raises(GuidanceError, match="negative has 32 features per token.*takes 64"):
        nag_model(sd15, negative_of("wan"))
    with pytest.raises(GuidanceError, match="negative must be a CONDITIONING"):
        nag_model(sd15, [])
    with pytest.raises(GuidanceError, match="unknown layer 'input.99'"):
        nag_model(sd15, negative, layers="input.99")
    with pytest.raises(GuidanceError, match="already has NAG"):
        nag_model(nag_model(sd15, negative), negative)
    with pytest.raises(GuidanceError, match="start_percent"):
        run_node("GuidersNAG", model=sd15, negative=negative, start_percent=0.8, end_percent=0.2)
    with pytest.raises(GuidanceError, match="negative has no pooled_output, which Kandinsky 5 embeds"):
        nag_model(tiny_model("kandinsky5"), [[negative_of("kandinsky5")[0][0], {}]])
    with pytest.raises(GuidanceError, match="negative has no attention_mask, conditioning_mt5xl, attention_mask_mt5xl"):
        nag_model(tiny_model("hunyuan_dit"), [[torch.zeros(1, 8, 32), {}]])


@pytest.mark.parametrize("cfg", [1.0, 5.0])
def test_nag_on_anima_embeds_the_negative_through_its_llm_adapter(guiders_pack, tiny_model, cfg):
    """Anima (ComfyUI 0.33.0): Cosmos Predict 2's cross_attn site, the negative carried through the model's LLM
    adapter with its own t5xxl_ids and weights, as the host embeds a prompt (the reference's negative comes from
    the host's own ``model_base.Anima.extra_conds`` in inference mode). Catches: the negative used as the text
    encoder gave it (``prepare_negative`` dropped); Z⁺ and Z⁻ swapped. One call per step (batch 1 at cfg 1)."""
    reason = host_lacks("anima")
    if reason is not None:
        pytest.skip(reason)
    model = tiny_model("anima")
    raw = negative_of("anima")[0][0]
    generator = torch.Generator().manual_seed(12)
    extras = {"t5xxl_ids": torch.randint(0, 32128, (raw.shape[1],), generator=generator, dtype=torch.int),
              "t5xxl_weights": 0.5 + torch.rand(raw.shape[1], generator=generator)}
    with torch.inference_mode():
        conds = model.model.extra_conds(cross_attn=raw, device=raw.device, **extras)
    adapted = conds["c_crossattn"].cond.clone()
    assert adapted.shape[1] == 512  # adapted and padded: not the raw negative
    with ForwardCounter(model) as counter:
        ours = sample_family(nag_model(model, [[raw, extras]]), "anima", cfg=cfg)
    assert counter.per_step() == [[1 if cfg == 1.0 else 2]] * 4  # no extra forward
    plain = sample_family(model, "anima", cfg=cfg)
    with reference_nag(model, "anima", [[adapted, {}]], 4.0, 2.5, 0.5):
        reference = sample_family(model, "anima", cfg=cfg)
    assert_parity(ours, reference, plain)


@pytest.mark.parametrize("family", ("pixart", "cosmos_predict2"))
def test_nag_layers_on_the_output_projection_sites(guiders_pack, tiny_model, family):
    """On the families NAG guides at the output projection, a layer list guides those blocks only: block 1 alone
    equals the reference in ``blocks.1.cross_attn`` alone, and differs from 'auto'. Catches: the layer list
    ignored by the output-projection hooks."""
    model = tiny_model(family)
    negative = negative_of(family)
    ours = sample_nag(nag_model(model, negative, layers="1"), family, 1.0)
    everywhere = sample_nag(nag_model(model, negative), family, 1.0)
    plain = sample_nag(model, family, 1.0)
    dm = model.model.diffusion_model
    module = dm.blocks[1].cross_attn
    make = _pixart_cross_attention if family == "pixart" else _cosmos_cross_attention
    module.forward = make(module, dm, negative[0][0], 4.0, 2.5, 0.5, lambda _options: True)
    handle = _remember_options(dm)
    try:
        reference = sample_nag(model, family, 1.0)
    finally:
        del module.forward
        handle.remove()
    assert relative_error(ours, everywhere) > 1e-3
    assert_parity(ours, reference, plain)


def _kandinsky5_text(dm, raw, pooled, timestep):
    """Kandinsky5.forward_orig's text path, written here from the host's modules: text_embeddings, then every
    text block with time_embeddings(t) + pooled_text_embeddings(y) and the 1-D rope over the text's length."""
    rows = timestep.shape[0]
    context = dm.text_embeddings(raw.expand(rows, -1, -1))
    time_embed = dm.time_embeddings(timestep, raw.dtype) + dm.pooled_text_embeddings(pooled.to(raw).expand(rows, -1))
    freqs = dm.rope_encode_1d(context.shape[1], device=raw.device, dtype=raw.dtype)
    for block in dm.text_transformer_blocks:
        context = block(context, time_embed, freqs)
    return context


def _kandinsky5_cross_attention(module, dm, negative, phi, tau, alpha, call):
    """Kandinsky 5's visual cross_attention: query_norm(to_query(x)), key_norm(to_key(c)) per head, to_value(c),
    out_layer; the negative through the text path at the call's t with its own pooled output."""
    heads, raw, pooled = module.num_heads, negative[0][0], negative[0][1]["pooled_output"]

    def per_head(t, norm):
        return norm(t.view(t.shape[0], t.shape[1], heads, -1)).flatten(2)

    def forward(x, context, transformer_options={}):  # noqa: B006
        q = per_head(module.to_query(x), module.query_norm)
        z = softmax_attention(q, per_head(module.to_key(context), module.key_norm), module.to_value(context), heads)
        rows = _cond_rows(transformer_options, x.shape[0])
        if rows:
            text = _kandinsky5_text(dm, raw.to(x), pooled, call["timestep"][rows])
            z_neg = softmax_attention(q[rows], per_head(module.to_key(text), module.key_norm), module.to_value(text),
                                      heads)
            z[rows] = paper_nag(z[rows], z_neg, phi, tau, alpha)
        return module.out_layer(z.to(x.dtype))

    return forward


@pytest.mark.parametrize("cfg", [1.0, 5.0])
def test_nag_on_kandinsky5_carries_the_negative_through_its_text_blocks(guiders_pack, tiny_model, cfg):
    """Kandinsky 5: every visual block's cross_attention, the negative embedded as the model embeds its prompt
    (text_embeddings, the text blocks modulated by the call's t and the negative's own pooled output). One call
    per step. Catches: Z⁺ and Z⁻ swapped; the negative's text blocks skipped (text_embeddings only); the text
    blocks run at t = 0 instead of the call's t."""
    model = tiny_model("kandinsky5")
    negative = negative_of("kandinsky5")
    assert "pooled_output" in negative[0][1]
    with ForwardCounter(model) as counter:
        ours = sample_family(nag_model(model, negative), "kandinsky5", cfg=cfg)
    assert counter.per_step() == [[1 if cfg == 1.0 else 2]] * 4
    plain = sample_family(model, "kandinsky5", cfg=cfg)
    dm = model.model.diffusion_model
    call = {}

    def remember(module, args, kwargs):
        call["timestep"] = args[1]

    replaced = [m for n, m in dm.named_modules() if n.endswith(".cross_attention")]
    assert replaced and all(n.startswith("visual_transformer_blocks") for n, m in dm.named_modules()
                            if n.endswith(".cross_attention"))
    for module in replaced:
        module.forward = _kandinsky5_cross_attention(module, dm, negative, 4.0, 2.5, 0.5, call)
    handle = dm.register_forward_pre_hook(remember, with_kwargs=True)
    try:
        reference = sample_family(model, "kandinsky5", cfg=cfg)
    finally:
        handle.remove()
        for module in replaced:
            del module.forward
    assert_parity(ours, reference, plain)


def _hunyuan_dit_text(dm, negative):
    """HunYuanDiT.forward's text states, written here from the host's modules: [CLIP; mlp_t5(mT5)], each one's
    padding tokens (mask 0) replaced by the model's text_embedding_padding."""
    clip, extras = negative[0][0].clone(), negative[0][1]
    t5 = dm.mlp_t5(extras["conditioning_mt5xl"])
    padding = dm.text_embedding_padding.to(clip)
    clip_keep, t5_keep = extras["attention_mask"].bool(), extras["attention_mask_mt5xl"].bool()
    clip = torch.where(clip_keep.unsqueeze(2), clip, padding[:dm.text_len])
    t5 = torch.where(t5_keep.unsqueeze(2), t5, padding[dm.text_len:])
    return torch.cat([clip, t5], dim=1)


def _hunyuan_dit_cross_attention(module, dm, text, phi, tau, alpha):
    """HunyuanDiT's attn2: q_norm(q_proj(x)) per head with the image rope, kv_proj(c) as (2, heads, head_dim)
    (keys, then values), k_norm, out_proj; returns a tuple, as the host's."""
    from comfy.ldm.hydit.attn_layers import apply_rotary_emb

    heads, head_dim = module.num_heads, module.head_dim

    def project(x, c, freqs):
        q = module.q_norm(module.q_proj(x).view(x.shape[0], x.shape[1], heads, head_dim))
        kv = module.kv_proj(c).view(c.shape[0], c.shape[1], 2, heads, head_dim)
        q = apply_rotary_emb(q, None, freqs)[0] if freqs is not None else q
        return q.flatten(2), module.k_norm(kv[:, :, 0]).flatten(2), kv[:, :, 1].flatten(2)

    def forward(x, y, freqs_cis_img=None):
        q, k, v = project(x, y, freqs_cis_img)
        z = softmax_attention(q, k, v, heads)
        rows = _cond_rows(dm.nag_reference_options, x.shape[0])
        if rows:
            _q, k_neg, v_neg = project(x[rows], text.to(x).expand(len(rows), -1, -1), freqs_cis_img)
            z[rows] = paper_nag(z[rows], softmax_attention(q[rows], k_neg, v_neg, heads), phi, tau, alpha)
        return (module.out_proj(z.to(x.dtype)),)

    return forward


@pytest.mark.parametrize("cfg", [1.0, 5.0])
def test_nag_on_hunyuan_dit_guides_attn2_with_the_models_text_states(guiders_pack, tiny_model, cfg):
    """HunyuanDiT: every block's attn2, the negative's CLIP and mT5 parts made into text states as the model
    makes its prompt's (mlp_t5, the padding tokens replaced). One call per step. Catches: Z⁺ and Z⁻ swapped; the
    padding replacement dropped; the image rope not applied to the negative's queries."""
    from tiny_models import make_hunyuan_dit_conditioning

    model = tiny_model("hunyuan_dit")
    positive, negative_cfg = make_hunyuan_dit_conditioning(seed=1)
    negative = make_hunyuan_dit_conditioning(seed=11)[0]
    latent = make_latent("hunyuan_dit", h=16, w=16, seed=2)

    def run(m):
        return sample(m, positive, negative_cfg, latent, cfg=cfg, steps=4, seed=3)

    with ForwardCounter(model) as counter:
        ours = run(nag_model(model, negative))
    assert counter.per_step() == [[1 if cfg == 1.0 else 2]] * 4
    plain = run(model)
    dm = model.model.diffusion_model
    text = _hunyuan_dit_text(dm, negative)
    replaced = [m for n, m in dm.named_modules() if n.endswith(".attn2")]
    for module in replaced:
        module.forward = _hunyuan_dit_cross_attention(module, dm, text, 4.0, 2.5, 0.5)
    handle = _remember_options(dm)
    try:
        reference = run(model)
    finally:
        handle.remove()
        for module in replaced:
            del module.forward
    assert_parity(ours, reference, plain)
