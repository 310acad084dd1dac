"""GuidersNAG on the joint-attention families (issue #12), through ComfyUI's real KSampler on tiny random-weight
models: Flux (dev: pooled CLIP vector, guidance embedding), Flux.2 (global modulation, text rope, the prompt
padded to 512 tokens by model_base.Flux2.extra_conds), Qwen-Image (one stack of joint blocks, text rope from
``txt_start``; its blocks written out in ``_qwen_block``) and SD3 (mmdit.py joint blocks, heads merged, no rope,
the last block's context_block pre_only; written out in ``_sd3_block``) and Chroma (Flux's blocks without
modulation layers: the negative's text stream takes the cond rows' ModulationOuts, as the authors' chroma/model.py
gives the negative rows ``mod_vectors[-origin_bsz:]``).

The reference is written here from the paper's equations (arXiv:2505.21179 §3) and the host's block code
(comfy/ldm/flux/layers.py DoubleStreamBlock.forward, SingleStreamBlock.forward), never through the pack's hooks:
during a reference pass of the UNPATCHED model, every double and single block's ``forward`` is replaced (an
instance attribute, removed afterwards) by one written here that computes the block as the host does, with a
softmax attention written here (float64), and, on the cond rows (``cond_or_uncond`` tag 0), carries the
negative's text tokens: they start as ``txt_in`` (after ``txt_norm``) of the negative, are modulated by the
cond rows' time/guidance embedding plus ``vector_in`` of the NEGATIVE's pooled output (Flux.2: the cond rows'
modulation), and in each block Z⁻ is the joint attention of [negative text; the cond rows' image tokens, the
same q, k, v as Z⁺] (rope of the negative's own text ids); the image rows of Z⁺ become
Z̃ = Z⁺ + φ(Z⁺ − Z⁻), r = ‖Z̃‖₁/‖Z⁺‖₁, Ẑ = Z̃·min(r, τ)/r, α·Ẑ + (1 − α)·Z⁺; the text rows of Z⁺ are left alone,
and the negative text tokens leave the block as the block's text stream makes them from Z⁻'s text rows.

Breaks tried (each fails ``test_joint_nag_matches_the_paper_through_sampling`` unless said otherwise):
- NAG on the text rows too (the span of the guided rows the whole sequence in nodes/host/nag_joint.py);
- Z⁺ and Z⁻ swapped (``nag_combine(z_neg_image, image...)``);
- τ ignored (``ratio.clamp(max=tau)`` → ``ratio`` in guidance_core/nag.py): fails the τ 1.5 cases;
- the negative's text stream not carried (its text tokens left as txt_in gave them, ``text_update`` returning
  ``text``);
- Flux: the negative's modulation without its own pooled vector (``pooled_delta`` None): fails the Flux cases;
- Qwen-Image: the negative's text rope ids from 0 instead of ``txt_start``: fails the Qwen-Image cases;
- SD3: the negative's modulation without its own pooled vector (``_sd3_negative_modulation`` returning the
  positive rows' c): fails the SD3 cases;
- SD3: the negative's text stream not carried (``_sd3_text_update`` returning ``text``): fails the SD3 cases;
- Chroma: the negative's double-block text modulation taken from the image stream's ModulationOuts
  (``modulation[0]`` for ``modulation[1]`` in ``_flux_text_qkv``): fails the Chroma cases. Not a break there:
  the negative's text rope left out (Chroma's txt_ids are all zero, its rope on the text is the identity).
- the window ignored (``_in_window`` always true): fails ``test_joint_nag_window_is_respected``.
"""

from __future__ import annotations

import contextlib
import math

import pytest
import torch
from harness import ForwardCounter, assert_window_is_partial
from support import assert_parity, node, relative_error, sample_family
from tiny_models import make_conditioning

JOINT_NAG_FAMILIES = ("flux", "flux2", "qwen_image", "sd3", "chroma")


def negative_of(family: str):
    return make_conditioning(family, seed=11)[0]


def nag_model(model, negative, **settings):
    inputs = {"scale": 4.0, "tau": 2.5, "alpha": 0.5, "layers": "auto", "start_percent": 0.0, "end_percent": 1.0}
    inputs.update(settings)
    return node("GuidersNAG", model=model, negative=negative, **inputs)


def attention_heads(q, k, v):
    """Softmax attention of heads-split (B, H, L, D) q, k, v, written here, float64 -> (B, L, H·D)."""
    logits = q.double() @ k.double().transpose(-1, -2) / math.sqrt(q.shape[-1])
    out = torch.softmax(logits, dim=-1) @ v.double()
    return out.transpose(1, 2).reshape(q.shape[0], q.shape[2], -1)


def paper_nag(z_pos, z_neg, phi, tau, alpha):
    """arXiv:2505.21179 §3, per token over the features, float64."""
    z_pos, z_neg = z_pos.double(), z_neg.double()
    z_tilde = z_pos + phi * (z_pos - z_neg)
    ratio = z_tilde.abs().sum(-1, keepdim=True) / z_pos.abs().sum(-1, keepdim=True)
    z_hat = z_tilde * torch.minimum(ratio, torch.full_like(ratio, tau)) / ratio
    return alpha * z_hat + (1 - alpha) * z_pos


def _cond_rows(transformer_options, batch):
    tags = transformer_options["cond_or_uncond"]
    size = batch // len(tags)
    return [j * size + r for j, tag in enumerate(tags) if tag == 0 for r in range(size)]


def _heads(qkv, heads):
    return qkv.view(qkv.shape[0], qkv.shape[1], 3, heads, -1).permute(2, 0, 3, 1, 4)


def _modulated(x, mod):
    return x * (1 + mod.scale) + mod.shift


def _select(value, rows):
    """The cond rows of a block's ``vec``: a tensor, or the ModulationOuts global modulation hands the blocks."""
    import dataclasses

    if isinstance(value, torch.Tensor):
        return value[rows]
    if isinstance(value, (tuple, list)):
        return type(value)(_select(item, rows) for item in value)
    if dataclasses.is_dataclass(value):
        return dataclasses.replace(value, **{f.name: _select(getattr(value, f.name), rows)
                                             for f in dataclasses.fields(value)})
    return value


def _double_block(block, call, phi, tau, alpha):
    from comfy.ldm.flux.math import apply_rope

    heads = block.num_heads

    def modulations(vec):
        return (block.img_mod(vec), block.txt_mod(vec)) if block.modulation else vec

    def forward(img, txt, vec, pe, attn_mask=None, transformer_options={}, **kwargs):  # noqa: B006
        (img_mod1, img_mod2), (txt_mod1, txt_mod2) = modulations(vec)
        img_q, img_k, img_v = _heads(block.img_attn.qkv(_modulated(block.img_norm1(img), img_mod1)), heads)
        img_q, img_k = block.img_attn.norm(img_q, img_k, img_v)
        txt_q, txt_k, txt_v = _heads(block.txt_attn.qkv(_modulated(block.txt_norm1(txt), txt_mod1)), heads)
        txt_q, txt_k = block.txt_attn.norm(txt_q, txt_k, txt_v)
        q, k = apply_rope(torch.cat((txt_q, img_q), 2), torch.cat((txt_k, img_k), 2), pe)
        v = torch.cat((txt_v, img_v), 2)
        attn = attention_heads(q, k, v)
        length = txt.shape[1]
        call["text_length"] = length
        rows = call["rows"]
        if rows:
            negative = call["text"]
            (_m1, _m2), (neg_mod1, neg_mod2) = modulations(call["vec"]) if block.modulation else _select(vec, rows)
            nq, nk, nv = _heads(block.txt_attn.qkv(_modulated(block.txt_norm1(negative), neg_mod1)), heads)
            nq, nk = block.txt_attn.norm(nq, nk, nv)
            nq, nk = apply_rope(nq, nk, call["pe"])
            z_neg = attention_heads(torch.cat((nq, q[rows, :, length:]), 2), torch.cat((nk, k[rows, :, length:]), 2),
                                    torch.cat((nv, v[rows, :, length:]), 2))
            attn[rows, length:] = paper_nag(attn[rows, length:], z_neg[:, negative.shape[1]:], phi, tau, alpha)
            neg_attn = z_neg[:, :negative.shape[1]].to(negative.dtype)
            negative = negative + neg_mod1.gate * block.txt_attn.proj(neg_attn)
            call["text"] = negative + neg_mod2.gate * block.txt_mlp(_modulated(block.txt_norm2(negative), neg_mod2))
        attn = attn.to(img.dtype)
        txt_attn, img_attn = attn[:, :length], attn[:, length:]
        img = img + img_mod1.gate * block.img_attn.proj(img_attn)
        img = img + img_mod2.gate * block.img_mlp(_modulated(block.img_norm2(img), img_mod2))
        txt = txt + txt_mod1.gate * block.txt_attn.proj(txt_attn)
        txt = txt + txt_mod2.gate * block.txt_mlp(_modulated(block.txt_norm2(txt), txt_mod2))
        return img, txt

    return forward


def _single_block(block, call, phi, tau, alpha):
    from comfy.ldm.flux.math import apply_rope

    heads, hidden = block.num_heads, block.hidden_size

    def project(x, mod):
        qkv, mlp = block.linear1(_modulated(block.pre_norm(x), mod)).split(
            [3 * hidden, block.mlp_hidden_dim_first], dim=-1)
        q, k, v = _heads(qkv, heads)
        q, k = block.norm(q, k, v)
        return q, k, v, block.mlp_act(mlp)

    def forward(x, vec, pe, attn_mask=None, transformer_options={}, **kwargs):  # noqa: B006
        mod = block.modulation(vec)[0] if block.modulation else vec
        q, k, v, mlp = project(x, mod)
        q, k = apply_rope(q, k, pe)
        attn = attention_heads(q, k, v)
        length, rows = call["text_length"], call["rows"]
        if rows:
            negative = call["text"]
            neg_mod = block.modulation(call["vec"])[0] if block.modulation else _select(vec, rows)
            nq, nk, nv, neg_mlp = project(negative, neg_mod)
            nq, nk = apply_rope(nq, nk, call["pe"])
            z_neg = attention_heads(torch.cat((nq, q[rows, :, length:]), 2), torch.cat((nk, k[rows, :, length:]), 2),
                                    torch.cat((nv, v[rows, :, length:]), 2))
            attn[rows, length:] = paper_nag(attn[rows, length:], z_neg[:, negative.shape[1]:], phi, tau, alpha)
            neg_attn = z_neg[:, :negative.shape[1]].to(negative.dtype)
            call["text"] = negative + neg_mod.gate * block.linear2(torch.cat((neg_attn, neg_mlp), 2))
        return x + mod.gate * block.linear2(torch.cat((attn.to(x.dtype), mlp), 2))

    return forward


def _negative_text_pe(dm, length, rows, device):
    """Flux._forward's txt_ids (zeros, a linspace on txt_ids_dims) through pe_embedder, for the negative."""
    ids = torch.zeros((rows, length, len(dm.params.axes_dim)), device=device)
    for axis in getattr(dm.params, "txt_ids_dims", None) or ():
        ids[:, :, axis] = torch.linspace(0, length - 1, steps=length, device=device)
    return dm.pe_embedder(ids)


@contextlib.contextmanager
def reference_nag(model, negative, phi, tau, alpha, sigma_window=None):
    """The paper's NAG on ``model`` (unpatched) during the ``with`` block (module docstring)."""
    from comfy.ldm.flux.layers import timestep_embedding

    dm = model.model.diffusion_model
    if type(dm).__name__ == "QwenImageTransformer2DModel":
        with reference_nag_qwen(model, negative, phi, tau, alpha, sigma_window):
            yield
        return
    if type(dm).__name__ == "OpenAISignatureMMDITWrapper":
        with reference_nag_sd3(model, negative, phi, tau, alpha, sigma_window):
            yield
        return
    pooled = negative[0][1].get("pooled_output")
    # The negative's context as the host's model makes a conditioning's (Flux.2: padded to 512 tokens in front).
    extras = {"pooled_output": pooled} if pooled is not None else {}
    raw = model.model.extra_conds(cross_attn=negative[0][0], device=negative[0][0].device, **extras)["c_crossattn"].cond
    call = {}

    def start(module, args, kwargs):
        x, timestep = args[0], args[1]
        options = kwargs["transformer_options"]
        sigma = float(options["sigmas"].flatten()[0])
        active = sigma_window is None or sigma_window[0] <= sigma <= sigma_window[1]
        rows = _cond_rows(options, x.shape[0]) if active else []
        call["rows"] = rows
        if not rows:
            return
        text = raw.to(x).expand(len(rows), -1, -1)
        text = dm.txt_in(dm.txt_norm(text) if getattr(dm, "txt_norm", None) is not None else text)
        call["text"], call["pe"] = text, _negative_text_pe(dm, raw.shape[1], len(rows), x.device)
        if hasattr(dm, "distilled_guidance_layer"):  # Chroma: the blocks' ModulationOuts, the cond rows' taken
            call["vec"] = None
            return
        vec = dm.time_in(timestep_embedding(timestep[rows], 256).to(x.dtype))
        guidance = args[4] if len(args) > 4 else kwargs.get("guidance")
        if dm.params.guidance_embed and guidance is not None:
            vec = vec + dm.guidance_in(timestep_embedding(guidance[rows], 256).to(x.dtype))
        if dm.vector_in is not None:
            vec = vec + dm.vector_in(pooled.to(x).expand(len(rows), -1)[:, :dm.params.vec_in_dim])
        call["vec"] = vec

    replaced = []
    for block in dm.double_blocks:
        block.forward = _double_block(block, call, phi, tau, alpha)
        replaced.append(block)
    for block in dm.single_blocks:
        block.forward = _single_block(block, call, phi, tau, alpha)
        replaced.append(block)
    handle = dm.register_forward_pre_hook(start, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()
        for block in replaced:
            del block.forward


def _qwen_block(block, call, phi, tau, alpha):
    """QwenImageTransformerBlock.forward and its Attention.forward written out (no timestep-zero rows, no text
    mask: the tiny conditioning has none), with NAG on the cond rows' image part of the joint attention."""
    from comfy.ldm.flux.math import apply_rope1

    attn_module, heads = block.attn, block.attn.heads

    def split(t):
        return t.view(t.shape[0], t.shape[1], heads, -1).transpose(1, 2)

    def modulate(x, params):
        shift, scale, gate = params.chunk(3, dim=-1)
        return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1), gate.unsqueeze(1)

    def text_qkv(txt, temb):
        first, second = block.txt_mod(temb).chunk(2, dim=-1)
        modulated, gate = modulate(block.txt_norm1(txt), first)
        q = attn_module.norm_added_q(split(attn_module.add_q_proj(modulated)))
        k = attn_module.norm_added_k(split(attn_module.add_k_proj(modulated)))
        return q, k, split(attn_module.add_v_proj(modulated)), gate, second

    def text_after(txt, attention, gate, second):
        txt = txt + gate * attn_module.to_add_out(attention)
        modulated, gate2 = modulate(block.txt_norm2(txt), second)
        return txt + gate2 * block.txt_mlp(modulated)

    def forward(hidden_states, encoder_hidden_states, encoder_hidden_states_mask=None, temb=None,
                image_rotary_emb=None, timestep_zero_index=None, transformer_options={}):  # noqa: B006
        assert timestep_zero_index is None and encoder_hidden_states_mask is None
        img_first, img_second = block.img_mod(temb).chunk(2, dim=-1)
        img_modulated, img_gate = modulate(block.img_norm1(hidden_states), img_first)
        img_q = attn_module.norm_q(split(attn_module.to_q(img_modulated)))
        img_k = attn_module.norm_k(split(attn_module.to_k(img_modulated)))
        img_v = split(attn_module.to_v(img_modulated))
        txt_q, txt_k, txt_v, txt_gate, txt_second = text_qkv(encoder_hidden_states, temb)
        q = apply_rope1(torch.cat((txt_q, img_q), 2), image_rotary_emb)
        k = apply_rope1(torch.cat((txt_k, img_k), 2), image_rotary_emb)
        v = torch.cat((txt_v, img_v), 2)
        attn = attention_heads(q, k, v)
        length, rows = encoder_hidden_states.shape[1], call["rows"]
        if rows:
            negative = call["text"]
            nq, nk, nv, n_gate, n_second = text_qkv(negative, temb[rows])
            nq, nk = apply_rope1(nq, call["pe"]), apply_rope1(nk, call["pe"])
            z_neg = attention_heads(torch.cat((nq, q[rows, :, length:]), 2), torch.cat((nk, k[rows, :, length:]), 2),
                                    torch.cat((nv, v[rows, :, length:]), 2))
            attn[rows, length:] = paper_nag(attn[rows, length:], z_neg[:, negative.shape[1]:], phi, tau, alpha)
            call["text"] = text_after(negative, z_neg[:, :negative.shape[1]].to(negative.dtype), n_gate, n_second)
        attn = attn.to(hidden_states.dtype)
        hidden_states = hidden_states + img_gate * attn_module.to_out[0](attn[:, length:])
        img_modulated2, img_gate2 = modulate(block.img_norm2(hidden_states), img_second)
        hidden_states = hidden_states + img_gate2 * block.img_mlp(img_modulated2)
        return text_after(encoder_hidden_states, attn[:, :length], txt_gate, txt_second), hidden_states

    return forward


@contextlib.contextmanager
def reference_nag_qwen(model, negative, phi, tau, alpha, sigma_window=None):
    """The paper's NAG on a Qwen-Image ``model`` (unpatched): the negative through txt_norm and txt_in, its text
    ids from _forward's txt_start (after the image grid's half-size) through pe_embedder."""
    dm = model.model.diffusion_model
    raw = negative[0][0]
    call = {}

    def start(module, args, kwargs):
        x = args[0]
        options = kwargs["transformer_options"]
        sigma = float(options["sigmas"].flatten()[0])
        active = sigma_window is None or sigma_window[0] <= sigma <= sigma_window[1]
        rows = _cond_rows(options, x.shape[0]) if active else []
        call["rows"] = rows
        if not rows:
            return
        call["text"] = dm.txt_in(dm.txt_norm(raw.to(x).expand(len(rows), -1, -1)))
        p = dm.patch_size
        first = round(max(((x.shape[-1] + p // 2) // p) // 2, ((x.shape[-2] + p // 2) // p) // 2))
        ids = torch.arange(first, first + raw.shape[1], device=x.device).reshape(1, -1, 1).repeat(len(rows), 1, 3)
        call["pe"] = dm.pe_embedder(ids).to(x.dtype)

    for block in dm.transformer_blocks:
        block.forward = _qwen_block(block, call, phi, tau, alpha)
    handle = dm.register_forward_pre_hook(start, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()
        for block in dm.transformer_blocks:
            del block.forward


def _sd3_block(block, call, phi, tau, alpha):
    """mmdit.py _block_mixing with DismantledBlock.pre_attention / post_attention written out (no x_block
    self-attention, no scale_mod_only: the tiny SD3 has neither), with NAG on the cond rows' image part of the
    joint attention; the last block's context_block is pre_only (shift and scale only, no text output)."""
    context_part, image_part = block.context_block, block.x_block
    heads = image_part.attn.num_heads
    assert not image_part.x_block_self_attn and not image_part.scale_mod_only

    def modulation(part, c):
        return part.adaLN_modulation(c).chunk(2 if part.pre_only else 6, dim=1)

    def modulate(x, shift, scale):
        return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)

    def project(part, x, mods):  # -> heads split (B, H, L, D)
        qkv = part.attn.qkv(modulate(part.norm1(x), mods[0], mods[1]))
        q, k, v = qkv.view(qkv.shape[0], qkv.shape[1], 3, heads, -1).unbind(2)
        return part.attn.ln_q(q).transpose(1, 2), part.attn.ln_k(k).transpose(1, 2), v.transpose(1, 2)

    def finish(part, x, attention, mods):
        _, _, gate, shift_mlp, scale_mlp, gate_mlp = mods
        x = x + gate.unsqueeze(1) * part.attn.proj(attention)
        return x + gate_mlp.unsqueeze(1) * part.mlp(modulate(part.norm2(x), shift_mlp, scale_mlp))

    def forward(context, x, c=None, use_checkpoint=False, transformer_options={}):  # noqa: B006
        context_mods, image_mods = modulation(context_part, c), modulation(image_part, c)
        cq, ck, cv = project(context_part, context, context_mods)
        xq, xk, xv = project(image_part, x, image_mods)
        q, k, v = torch.cat((cq, xq), 2), torch.cat((ck, xk), 2), torch.cat((cv, xv), 2)
        attn = attention_heads(q, k, v)
        length, rows = context.shape[1], call["rows"]
        if rows:
            negative = call["text"]
            negative_mods = modulation(context_part, call["c"])
            nq, nk, nv = project(context_part, negative, negative_mods)
            z_neg = attention_heads(torch.cat((nq, q[rows, :, length:]), 2), torch.cat((nk, k[rows, :, length:]), 2),
                                    torch.cat((nv, v[rows, :, length:]), 2))
            attn[rows, length:] = paper_nag(attn[rows, length:], z_neg[:, negative.shape[1]:], phi, tau, alpha)
            if not context_part.pre_only:
                neg_attn = z_neg[:, :negative.shape[1]].to(negative.dtype)
                call["text"] = finish(context_part, negative, neg_attn, negative_mods)
        attn = attn.to(x.dtype)
        context = None if context_part.pre_only else finish(context_part, context, attn[:, :length], context_mods)
        return context, finish(image_part, x, attn[:, length:], image_mods)

    return forward


@contextlib.contextmanager
def reference_nag_sd3(model, negative, phi, tau, alpha, sigma_window=None):
    """The paper's NAG on an SD3 ``model`` (unpatched): the negative through context_embedder (the tiny SD3 has
    no context_processor and no register tokens), its modulation t_embedder(t) + y_embedder of the NEGATIVE's
    pooled output (MMDiT.forward's c with the negative's y)."""
    dm = model.model.diffusion_model
    assert dm.context_processor is None and dm.register_length == 0
    raw, pooled = negative[0][0], negative[0][1]["pooled_output"]
    call = {}

    def start(module, args, kwargs):
        x, timesteps = args[0], args[1]
        options = kwargs["transformer_options"]
        sigma = float(options["sigmas"].flatten()[0])
        active = sigma_window is None or sigma_window[0] <= sigma <= sigma_window[1]
        rows = _cond_rows(options, x.shape[0]) if active else []
        call["rows"] = rows
        if not rows:
            return
        call["text"] = dm.context_embedder(raw.to(x).expand(len(rows), -1, -1))
        call["c"] = dm.t_embedder(timesteps[rows], dtype=x.dtype) + dm.y_embedder(pooled.to(x).expand(len(rows), -1))

    for block in dm.joint_blocks:
        block.forward = _sd3_block(block, call, phi, tau, alpha)
    handle = dm.register_forward_pre_hook(start, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()
        for block in dm.joint_blocks:
            del block.forward


def _plain_reference(model, family):
    """The reference blocks with no NAG (no cond rows guided): the written-out blocks alone equal the host's."""
    return reference_nag(model, negative_of(family), 0.0, 2.5, 0.5, sigma_window=(-1.0, -1.0))


@pytest.mark.parametrize("family", JOINT_NAG_FAMILIES)
def test_written_out_blocks_equal_the_hosts(guiders_pack, tiny_model, family):
    """The reference's blocks, with NAG off, sample as the host's own blocks: the reference is the host's model."""
    model = tiny_model(family)
    plain = sample_family(model, family, cfg=1.0)
    with _plain_reference(model, family):
        written = sample_family(model, family, cfg=1.0)
    assert relative_error(written, plain) < 1e-5


@pytest.mark.parametrize("family", JOINT_NAG_FAMILIES)
@pytest.mark.parametrize(("cfg", "tau"), [(1.0, 2.5), (4.0, 2.5), (1.0, 1.5), (4.0, 1.5)])
def test_joint_nag_matches_the_paper_through_sampling(guiders_pack, tiny_model, family, cfg, tau):
    """NAG at cfg 1 (cond only) and with CFG (the uncond untouched) equals the paper's equations in every
    double and single block's joint attention. Catches every break in the module docstring."""
    model = tiny_model(family)
    negative = negative_of(family)
    phi, alpha = 4.0, 0.5
    ours = sample_family(nag_model(model, negative, tau=tau, alpha=alpha, scale=phi), family, cfg=cfg)
    plain = sample_family(model, family, cfg=cfg)
    with reference_nag(model, negative, phi, tau, alpha):
        reference = sample_family(model, family, cfg=cfg)
    assert_parity(ours, reference, plain)


@pytest.mark.parametrize("family", JOINT_NAG_FAMILIES)
def test_joint_nag_window_is_respected(guiders_pack, tiny_model, family):
    """Outside start/end percent the step is plain: equal to the reference applying NAG only inside the σ
    window. Catches: the window ignored."""
    model = tiny_model(family)
    negative = negative_of(family)
    start, end, steps = 0.0, 0.5, 4
    phi = 10.0  # the tiny Flux.2 moves little in the first half at φ 4
    assert_window_is_partial(model, start, end, steps)
    sampling = model.get_model_object("model_sampling")
    window = (float(sampling.percent_to_sigma(end)), float(sampling.percent_to_sigma(start)))
    ours = sample_family(nag_model(model, negative, scale=phi, start_percent=start, end_percent=end), family, cfg=1.0)
    plain = sample_family(model, family, cfg=1.0)
    with reference_nag(model, negative, phi, 2.5, 0.5, sigma_window=window):
        reference = sample_family(model, family, cfg=1.0)
    with reference_nag(model, negative, phi, 2.5, 0.5):
        everywhere = sample_family(model, family, cfg=1.0)
    assert relative_error(reference, everywhere) > 1e-3  # the window changes the reference
    assert_parity(ours, reference, plain)


@pytest.mark.parametrize("family", JOINT_NAG_FAMILIES)
def test_joint_nag_negative_matters_and_equal_prompts_cancel(guiders_pack, tiny_model, family):
    """A different negative changes the result; a negative equal to the sampler's positive prompt leaves it as
    it is (Z⁻ = Z⁺ in every block: the negative's text stream is the positive's), as the formula says; φ 0 is
    plain exactly."""
    model = tiny_model(family)
    plain = sample_family(model, family, cfg=1.0)
    other = sample_family(nag_model(model, negative_of(family)), family, cfg=1.0)
    assert relative_error(other, plain) > 1e-2
    positive = make_conditioning(family, seed=1)[0]  # sample_family's prompt
    same = sample_family(nag_model(model, positive), family, cfg=1.0)
    assert relative_error(same, plain) < 1e-4
    assert torch.equal(sample_family(nag_model(model, negative_of(family), scale=0.0), family, cfg=1.0), plain)


@pytest.mark.parametrize("family", JOINT_NAG_FAMILIES)
def test_joint_nag_adds_no_model_call(guiders_pack, tiny_model, family):
    """cfg 1: one call of batch 1 per step, the cond only; cfg 4: one call of 2 (cond + uncond)."""
    model = tiny_model(family)
    patched = nag_model(model, negative_of(family))
    with ForwardCounter(model) as counter:
        sample_family(patched, family, cfg=1.0)
    assert counter.per_step() == [[1]] * 4
    assert {call.cond_or_uncond for call in counter.calls} == {(0,)}
    with ForwardCounter(model) as counter:
        sample_family(patched, family, cfg=4.0)
    assert counter.per_step() == [[2]] * 4


def test_joint_nag_layers_guide_only_the_chosen_blocks(guiders_pack, tiny_model):
    """A layer list guides those blocks only (the negative's text stream still runs through every block):
    'single.1' alone differs from 'auto' and from plain."""
    model = tiny_model("flux")
    negative = negative_of("flux")
    one = sample_family(nag_model(model, negative, layers="single.1"), "flux", cfg=1.0)
    everywhere = sample_family(nag_model(model, negative), "flux", cfg=1.0)
    plain = sample_family(model, "flux", cfg=1.0)
    assert relative_error(one, plain) > 1e-3 and relative_error(one, everywhere) > 1e-3


def test_joint_nag_leaves_no_trace(guiders_pack, tiny_model):
    """After sampling no hook is left on any module and no attention override in the options."""
    model = tiny_model("flux")
    patched = nag_model(model, negative_of("flux"))
    sample_family(patched, "flux", cfg=4.0)
    for module in model.model.diffusion_model.modules():
        assert not module._forward_hooks and not module._forward_pre_hooks, type(module).__name__
    assert "optimized_attention_override" not in patched.model_options.get("transformer_options", {})


@pytest.mark.parametrize("family", ("flux", "qwen_image"))
def test_joint_nag_stacks_with_pag_and_slg_in_one_forward(guiders_pack, tiny_model, family):
    """NAG under this pack's PAG (the DiT attention override wrapped by NAG's) and SLG (the dit block patch) at
    cfg 1: one call of 2 per step (cond + the perturbed branch, which gets NAG too), finite, and NAG acts."""
    model = tiny_model(family)
    negative = negative_of(family)
    every_step = {"start_percent": 0.0, "end_percent": 1.0}
    for method, settings in (("GuidersPAG", {"scale": 2.0}), ("GuidersSLG", {"scale": 2.0, **every_step})):
        both = node(method, model=nag_model(model, negative), **settings)
        with ForwardCounter(model) as counter:
            result = sample_family(both, family, cfg=1.0)
        assert counter.per_step() == [[2]] * 4, method
        alone = sample_family(node(method, model=model, **settings), family, cfg=1.0)
        assert torch.isfinite(result).all() and relative_error(result, alone) > 1e-2, method


def test_joint_nag_refuses_a_padded_negative(guiders_pack, tiny_model):
    """A negative whose attention_mask has padding is refused with the reason (its padding would be attended to)."""
    model = tiny_model("qwen_image")
    context = negative_of("qwen_image")[0][0]
    mask = torch.ones(1, context.shape[1], dtype=torch.long)
    mask[:, -2:] = 0
    with pytest.raises(ValueError, match="GuidersNAG: negative has padding tokens"):
        nag_model(model, [[context, {"attention_mask": mask}]])
