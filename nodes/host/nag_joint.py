"""NAG on joint attention (Flux, Flux.2, Chroma, Qwen-Image, SD3/SD3.5): the negative prompt's text tokens carried
through every block beside the call's own rows, and in each block's joint attention the image rows guided by
``nag_combine``.

What NAG is on a joint-attention block (arXiv:2505.21179 §3, with the same image queries for Z⁺ and Z⁻):

    Z⁺ = Attn([Q_t⁺; Q_x], [K_t⁺; K_x], [V_t⁺; V_x])      the block's own attention (text first on Flux)
    Z⁻ = Attn([Q_t⁻; Q_x], [K_t⁻; K_x], [V_t⁻; V_x])      the negative's text tokens t⁻ beside the same image x
    image rows of Z⁺  <-  nag_combine(Z⁺_x, Z⁻_x)          text rows of Z⁺ untouched; then the block goes on

and the negative's text tokens leave each block as the block's text stream makes them from the text rows of Z⁻
(its own modulation, projection, MLP), so the next block's K_t⁻, V_t⁻ are the negative's at that depth.

What was checked in the authors' code (ChenDarYen/ComfyUI-NAG @ef8a641 flux/layers.py, flux/model.py; their
diffusers reference ChenDarYen/Normalized-Attention-Guidance @69159ca src/attention_flux_nag.py,
src/transformer_flux.py, src/normalization.py; read, not copied):
- Where: every double and every single block (NAGDoubleStreamBlock and NAGSingleStreamBlock replace all of
  them; the diffusers reference sets NAGFluxAttnProcessor2_0 on every attention processor).
- Batching: the negative's text is appended as extra batch rows of ``txt`` (``origin_bsz = len(txt) - len(img)``),
  paired with the LAST rows of the image batch (the positive rows under ComfyUI's [uncond, cond] order);
  padding removed (``context_pad_len``/``nag_pad_len``): Z⁻ is computed at the negative's own length. Here: one
  negative stream per positive row (the cond chunk and this pack's branches from it, by ``cond_or_uncond``), at
  its own length, never tiled.
- Double block: Z⁻ is a second attention of [txt⁻; img] with the positive rows' image q, k, v (``img_q[-B:]``),
  rope from the negative's own txt_ids; NAG replaces the positive rows' image part of the attention output
  before ``img_attn.proj``; the text rows keep their own attention; the negative's text rows are updated from
  the text part of Z⁻ with their own modulation (txt_mod of the negative rows' ``vec``).
- Modulation: the image stream takes the positive rows' ``vec``; the negative's text rows take ``vec`` of the
  positive rows with ``vector_in`` of the NEGATIVE's pooled CLIP output (``vec + vector_in(y)`` with ``y`` the
  concatenated pooled outputs). Here the same: the positive rows' vec minus vector_in of their pooled output,
  plus vector_in of the negative's (Flux.2 and Chroma have no pooled input: the positive rows' modulation).
- Norm and dims: ``utils.py:nag``, L1 over the last dimension (heads merged, (B, tokens, heads·head_dim)) of the
  attention output before the output projection, per token; here ``guidance_core.nag.nag_combine``.
- Single block, where one differs: the authors duplicate the positive image tokens into the negative rows at the
  double-to-single transition (``img = cat(img, img[-B:])``) and run those rows through every single block as a
  whole sequence [txt⁻; image copy], writing the guided image attention into BOTH rows' image part before
  ``linear2``. Where the negative rows' modulation equals the positive's (no pooled text in it: Flux.2, Chroma),
  the copy then stays equal to the positive image tokens block after block (same input, same modulation, same
  guided attention), so their Z⁻ is Attn([Q_t⁻; Q_x], ...) with the positive's image tokens, as here. On Flux.1
  their copy is modulated with the negative's pooled vector and drifts from the positive image; here the image
  tokens of Z⁻ are the positive's in every block (the paper's same Q, and the authors' own double-block rule),
  so NAG costs one extra attention per block and the negative's text tokens, not a second pass of the image
  tokens through the single blocks' projections and MLPs.

Chroma (ComfyUI-NAG chroma/model.py checked): Flux's blocks with the distilled approximator's ModulationOuts;
the authors give the negative rows the positive rows' ``mod_vectors`` (``mod_vectors[-origin_bsz:]``), and so
here (``_flux_negative_modulation``: the positive rows' ModulationOuts); no pooled input.

SD3 / SD3.5 (no authors' code for it read here): the same rule as Flux.1's double block, on the joint blocks'
context_block (the text stream) and x_block: the negative's text rows take the positive rows' c with
y_embedder of the negative's pooled output in place of the positive's; the attention is called heads merged
(B, L, H·D), no rope. The last block's context_block is pre_only (no text output): the negative's text gives
its q, k, v there and its stream ends. SD3.5 Medium's x_block self-attention (attn2, the block's second
attention call, image only) is left as it is.

The host mechanism, for one diffusion-model call (an APPLY_MODEL wrapper, only inside NAG's window and when the
call has positive rows): forward pre-hooks on every double and single block compute the negative text tokens'
q, k, v with the block's own modules; the attention override computes Z⁺ as the host would, then Z⁻ (one more
attention call of the positive rows), and writes the guided image rows; forward hooks update the negative's
text tokens from Z⁻'s text rows. All removed when the call returns or raises. Blocks outside the chosen
``layers`` still carry the negative's text tokens (a later chosen block needs them at its depth) but leave Z⁺
as it is.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ...guidance_core.nag import nag_combine
from . import families
from .layers import Layer
from .marks import GuidanceError, attention_override_installed


@dataclass
class _JointState:
    """One call's negative text stream and the block now running."""

    site: families.JointNagSite
    rows: torch.Tensor
    batch: int
    scale: float
    tau: float
    alpha: float
    text: torch.Tensor  # the negative's text tokens, one row per positive row
    text_pe: object
    pooled_negative: torch.Tensor | None
    pooled_delta: torch.Tensor | None = None
    text_length: int | None = None  # the positive's text tokens in the joint sequence
    block: dict | None = None
    used: int = 0
    blocks_seen: list = field(default_factory=list)


def _chosen(layer: Layer, chosen: tuple[Layer, ...] | None) -> bool:
    return chosen is None or any(c.kind == layer.kind and c.index == layer.index for c in chosen)


def run_joint_nag(executor, setup, rows: list[int], scale: float, x, t, c_concat, c_crossattn, control,
                  transformer_options: dict, kwargs: dict):
    """The diffusion-model call with NAG in every block's joint attention (module docstring)."""
    site = families.JOINT_NAG_SITES[setup.family]
    record = families.FAMILY_BY_KEY[setup.family]
    base_model = executor.class_obj
    dm = base_model.diffusion_model
    dtype = base_model.manual_cast_dtype or base_model.get_dtype()
    index = torch.tensor(rows, device=x.device)
    negative = setup.negative.to(device=x.device, dtype=dtype)
    negative = negative.index_select(0, torch.arange(len(rows), device=x.device) % negative.shape[0])
    if site.prepare_text is not None:
        negative = site.prepare_text(negative)
    pooled = setup.negative_extras.get("pooled_output") if site.pooled else None
    if pooled is not None:
        pooled = pooled.to(device=x.device, dtype=dtype)
        pooled = pooled.index_select(0, torch.arange(len(rows), device=x.device) % pooled.shape[0])
    state = _JointState(site, index, x.shape[0], scale, setup.tau, setup.alpha, site.embed_text(dm, negative),
                        site.text_rope(dm, negative.shape[1], len(rows), x), pooled)
    handles = _install_hooks(dm, record, site, setup.layers, state)
    override = _make_joint_override(state, transformer_options.get("optimized_attention_override"))
    try:
        with attention_override_installed(transformer_options, override):
            return executor(x, t, c_concat, c_crossattn, control, transformer_options, **kwargs)
    finally:
        for handle in handles:
            handle.remove()


def _install_hooks(dm, record: families.ModelFamily, site: families.JointNagSite, chosen, state: _JointState):
    handles = []
    embedding = getattr(dm, site.pooled, None) if site.pooled else None
    if embedding is not None:
        def pooled_part(module, args, output):  # vector_in(y) of the call: the positive rows' pooled part
            negative = state.pooled_negative
            width = args[0].shape[-1]
            negative = negative[..., :width] if negative is not None else args[0].new_zeros(len(state.rows), width)
            # forward, not __call__: this hook is on the module itself
            state.pooled_delta = module.forward(negative.to(args[0])) - output.index_select(0, state.rows)

        handles.append(embedding.register_forward_hook(pooled_part))
    text_input = getattr(dm, site.text_input)

    def text_length(module, args, output):
        state.text_length = output.shape[1]

    handles.append(text_input.register_forward_hook(text_length))
    for kind, attribute in record.block_lists.items():
        for i, block in enumerate(getattr(dm, attribute)):
            handles += _hook_block(block, kind, _chosen(Layer(kind, i), chosen), state)
    return handles


def _hook_block(block, kind: str, guided: bool, state: _JointState) -> list:
    site = state.site

    def enter(module, args, kwargs):
        named = site.block_inputs(kind, args, kwargs)
        batch, text_length = named["batch"], named.get("text_length")
        if text_length is not None:
            state.text_length = text_length
        if batch != state.batch:
            raise GuidanceError("GuidersNAG: a joint-attention block was run on part of the batch (another "
                                "node's block patch computing some chunks only); NAG's negative text stream "
                                "follows the whole call's rows, so it cannot run under that patch.")
        modulation = site.negative_modulation(module, kind, named, state.rows, state.pooled_delta)
        (q, k, v), saved = site.text_qkv(module, kind, state.text, modulation)
        if state.text_pe is not None:
            q, k = site.apply_rope(q, k, state.text_pe)
        state.block = {"q": q, "k": k, "v": v, "saved": saved, "kind": kind, "guided": guided, "calls": 0,
                       "attention": None}

    def leave(module, args, kwargs, output):
        current, state.block = state.block, None
        if current is None or current["attention"] is None:
            raise GuidanceError("GuidersNAG: a joint-attention block made no attention call NAG saw; this "
                                "ComfyUI version's model code differs from the one NAG was written for.")
        state.text = site.text_update(module, kind, state.text, current["saved"], current["attention"])
        state.blocks_seen.append(kind)

    return [block.register_forward_pre_hook(enter, with_kwargs=True),
            block.register_forward_hook(leave, with_kwargs=True)]


def _make_joint_override(state: _JointState, previous: Callable | None):
    def nag_joint_attention_override(func, *args, **kwargs):
        call = (lambda *a, **kw: previous(func, *a, **kw)) if previous is not None else func
        current = state.block
        if current is None or current["calls"] > 0:
            return call(*args, **kwargs)
        current["calls"] += 1
        q, k, v = args[:3]
        heads = args[3] if len(args) > 3 else kwargs["heads"]
        # Heads split (B, H, L, D) with skip_reshape (Flux, Qwen-Image), or merged (B, L, H·D) (SD3's
        # _block_mixing); the output is (B, L, H·D) either way.
        seq = 2 if kwargs.get("skip_reshape") else 1
        if kwargs.get("skip_output_reshape") or q.ndim != seq + 2:
            raise GuidanceError("GuidersNAG: the joint attention was called in a layout NAG does not handle; this "
                                "ComfyUI version's model code differs from the one NAG was written for.")
        z_pos = call(*args, **kwargs)
        text, rows = state.text_length, state.rows
        site = state.site

        def negative_sequence(ours, theirs):  # [negative text; the positive rows' image tokens]
            image = theirs.index_select(0, rows)
            image = image.narrow(seq, text, theirs.shape[seq] - text) if site.text_first \
                else image.narrow(seq, 0, theirs.shape[seq] - text)
            return torch.cat((ours, image) if site.text_first else (image, ours), dim=seq)

        rest = {key: value for key, value in kwargs.items() if key not in ("heads", "mask")}
        # The positive's mask (its text padding) is for its own tokens; the negative's are all attended to (a
        # negative with padding is refused in run_joint_nag).
        z_neg = call(negative_sequence(current["q"], q), negative_sequence(current["k"], k),
                     negative_sequence(current["v"], v), heads, **rest)
        length = current["q"].shape[seq]
        if site.text_first:
            current["attention"], z_neg_image = z_neg[:, :length], z_neg[:, length:]
        else:
            current["attention"], z_neg_image = z_neg[:, -length:], z_neg[:, :-length]
        if not current["guided"]:
            return z_pos
        span = slice(text, None) if site.text_first else slice(0, z_pos.shape[1] - text)
        image = z_pos[:, span]
        guided = nag_combine(image.index_select(0, rows), z_neg_image, state.scale, state.tau, state.alpha)
        out = z_pos.clone()
        out[:, span] = image.index_copy(0, rows, guided)
        state.used += 1
        return out

    return nag_joint_attention_override
