"""TPG, TSG and ICG (guidance_core/condition_free.py) through real sampling on tiny UNet and DiT models, against
references written here from the papers, each applied the way ComfyUI's PerturbedAttentionGuidance applies PAG
(an extra cond pass after CFG, ``denoised + s·(cond − perturbed)``), never through the pack's patches.

TPG (Rajabi et al. 2025, arXiv:2506.10036; the authors' pipeline_sdxl_tpg.py): the hidden states entering each
chosen transformer block are shuffled on the token dimension, one permutation per block call, not undone.
The reference does it with a forward pre-hook on the host's own block modules (UNet: each
BasicTransformerBlock of the block; Flux: the DoubleStreamBlock's ``img``; Wan: the WanAttentionBlock's x),
drawing the permutation from the core's seeded ``token_permutation`` (checked to be a fresh permutation per
step and layer in tests/core/test_condition_free.py) at the step the reference counts itself.

Host behaviour these tests depend on (ComfyUI 0.8.0 and 0.33.0):
- comfy/ldm/modules/attention.py SpatialTransformer.forward calls ``block(x, context=..., transformer_options=...)``
  for each BasicTransformerBlock (x positional: its (B, H·W, C) hidden states).
- comfy/ldm/flux/model.py forward_orig calls each double block as ``block(img=..., txt=..., vec=..., pe=...)``
  (the image stream alone; the text is ``txt``), inside the ``dit`` replace patch when one is set.
- comfy/ldm/wan/model.py forward_orig calls ``block(x, e=..., freqs=..., context=...)``; the text enters by
  cross-attention only.
"""

from __future__ import annotations

import contextlib

import pytest
import torch
from harness import ForwardCounter, assert_window_is_partial
from references import perturbed_pass_reference
from support import MIN_EFFECT, STEPS, assert_parity, linear_scale_per_step, node, relative_error, sample_family

from guidance_core.condition_free import keyed_normal, token_permutation

SCALE = 3.0
SEED = 7
FLUX_TEXT_TOKENS = 16  # tiny_models' Flux prompt: the text part of a single block's cat(text, image)


def _blocks(diffusion_model, family: str, layer: str):
    """(layer key for the permutation, module) of the host blocks whose input TPG shuffles."""
    kind, _, index = layer.partition(".")
    if family == "sd15":  # every BasicTransformerBlock of the UNet block, keyed by transformer index
        block = (diffusion_model.middle_block if kind == "middle"
                 else getattr(diffusion_model, f"{kind}_blocks")[int(index)])
        transformers = [m for m in block.modules() if type(m).__name__ == "SpatialTransformer"]
        return [((kind, int(index or 0), i), b) for t in transformers for i, b in enumerate(t.transformer_blocks)]
    if family == "flux" and kind == "single":  # x = cat(text, image): the image part only
        return [(("single", int(index), None), diffusion_model.single_blocks[int(index)])]
    if family == "flux":
        return [(("double", int(index), None), diffusion_model.double_blocks[int(index)])]
    return [(("double", int(layer), None), diffusion_model.blocks[int(layer)])]  # wan: "1"


def _at_scale(guided, denoised, scale_of_sigma, sigma: float):
    """The term s·(cond − perturbed) at the step's scale from ``scale_of_sigma`` (None: SCALE): the term is
    linear in s, so denoised + (s/SCALE)·(guided − denoised) from the reference's output at SCALE."""
    if scale_of_sigma is None:
        return guided
    return denoised + scale_of_sigma(sigma) / SCALE * (guided - denoised)


def tokens_shuffled_reference(model, family: str, layer: str, seed: int, window=None, scale_of_sigma=None):
    """TPG's perturbed pass: every chosen block's input tokens permuted (all of them: a cond-only pass), the
    output left permuted; the permutation of (seed, step, block) as the core draws it. ``window`` (σ_start,
    σ_end): outside it the term is off, so the step is plain CFG."""
    steps = {"count": -1}

    @contextlib.contextmanager
    def perturbed(diffusion_model, model_options):
        def shuffle_at_input(key):
            def pre_hook(module, args, kwargs):
                name = "img" if family == "flux" and key[0] == "double" else None
                x = kwargs[name] if name else args[0]
                text = FLUX_TEXT_TOKENS if key[0] == "single" else 0
                permutation = token_permutation(x.shape[1] - text, seed, steps["count"], *key, device=x.device)
                x = torch.cat([x[:, :text], x[:, text:][:, permutation]], dim=1)
                return (args, {**kwargs, name: x}) if name else ((x, *args[1:]), kwargs)
            return pre_hook

        handles = [module.register_forward_pre_hook(shuffle_at_input(key), with_kwargs=True)
                   for key, module in _blocks(diffusion_model, family, layer)]
        try:
            yield model_options
        finally:
            for handle in handles:
                handle.remove()

    reference = perturbed_pass_reference(model, perturbed, SCALE)
    post_cfg = reference.model_options["sampler_post_cfg_function"][-1]

    def counted(args):
        steps["count"] += 1
        sigma = float(args["sigma"].flatten()[0])
        if window is not None and not window[1] <= sigma <= window[0]:
            return args["denoised"]
        return _at_scale(post_cfg(args), args["denoised"], scale_of_sigma, sigma)

    reference.model_options["sampler_post_cfg_function"][-1] = counted
    return reference


TPG_CASES = [pytest.param("sd15", "input.3", id="unet-input.3"), pytest.param("sd15", "middle", id="unet-middle"),
             pytest.param("flux", "double.1", id="flux-double.1"), pytest.param("flux", "single.1", id="flux-single.1"),
             pytest.param("wan", "1", id="wan-block1")]


@pytest.mark.parametrize(("family", "layer"), TPG_CASES)
def test_tpg_matches_token_shuffle_reference(guiders_pack, tiny_model, family, layer) -> None:
    """GuidersTPG = plain CFG + s·(cond − cond with the chosen blocks' input tokens shuffled).

    Breaks caught (each tried, every case fails): the shuffle applied to every row, cond and uncond too
    (error 4e-1 .. 6e-1); a different permutation than the step's (the key's step + 1: error 4e-1 .. 6e-1); on
    Flux's single blocks, the text tokens shuffled with the image's."""
    model = tiny_model(family)
    ours = node("GuidersTPG", model=model, scale=SCALE, layers=layer, start_percent=0.0, end_percent=1.0, seed=SEED)
    reference = tokens_shuffled_reference(model, family, layer, SEED)

    assert_parity(sample_family(ours, family), sample_family(reference, family), sample_family(model, family))


@pytest.mark.parametrize("family", ["sd15", "flux"])
def test_tpg_window_is_respected(guiders_pack, tiny_model, family) -> None:
    """Outside start..end the TPG term is off (its branch not evaluated); inside it matches the reference.
    Break caught (tried): the window ignored by the node (both cases fail)."""
    model = tiny_model(family)
    start, end = 0.3, 1.0
    assert_window_is_partial(model, start, end, STEPS)
    sampling = model.get_model_object("model_sampling")
    window = (float(sampling.percent_to_sigma(start)), float(sampling.percent_to_sigma(end)))
    layer = "input.3" if family == "sd15" else "double.1"
    ours = node("GuidersTPG", model=model, scale=SCALE, layers=layer, start_percent=start, end_percent=end, seed=SEED)
    reference = tokens_shuffled_reference(model, family, layer, SEED, window=window)

    with ForwardCounter(model) as counter:
        result = sample_family(ours, family)
    assert_parity(result, sample_family(reference, family), sample_family(model, family))
    sizes = counter.per_step()
    assert sorted({tuple(s) for s in sizes}) == [(2,), (3,)], sizes  # TPG's branch only inside the window


@pytest.mark.parametrize("family", ["sd15", "flux", "wan"])
def test_tpg_rides_in_the_one_batched_forward(guiders_pack, tiny_model, family) -> None:
    """One forward per step of cond, uncond and the TPG branch (batch 3); with cfg 1, cond and TPG (batch 2).
    Break caught: the branch evaluated in a call of its own (per step [2, 1])."""
    model = tiny_model(family)
    layer = {"sd15": "input.3", "flux": "double.1", "wan": "1"}[family]
    ours = node("GuidersTPG", model=model, scale=SCALE, layers=layer, start_percent=0.0, end_percent=1.0, seed=SEED)
    with ForwardCounter(model) as counter:
        out = sample_family(ours, family)
    assert counter.per_step() == [[3]] * STEPS
    with ForwardCounter(model) as counter:
        sample_family(ours, family, cfg=1.0)
    assert counter.per_step() == [[2]] * STEPS
    assert relative_error(out, sample_family(model, family)) > MIN_EFFECT


def test_tpg_seed_changes_the_permutations(guiders_pack, tiny_model) -> None:
    """The same seed gives the same result, another seed another one (the permutations are seeded)."""
    model = tiny_model("sd15")
    run = [sample_family(node("GuidersTPG", model=model, scale=SCALE, layers="input.3", start_percent=0.0,
                                   end_percent=1.0, seed=seed), "sd15") for seed in (1, 1, 2)]
    assert torch.equal(run[0], run[1])
    assert relative_error(run[0], run[2]) > 1e-4


def test_tpg_refuses_a_family_without_a_block_patch(guiders_pack, tiny_model) -> None:
    """Families reached by forward hooks only (Lumina 2 / Z-Image) are refused, naming the supported ones."""
    with pytest.raises(Exception, match="not supported"):
        node("GuidersTPG", model=tiny_model("lumina2"), scale=SCALE, layers="auto", start_percent=0.0,
             end_percent=1.0)


# ---------------------------------------------------------------------------------------------------------
# TSG: the cond branch at a noised time-step embedding

TIME_EMBEDDINGS = {"sd15": "time_embed", "sd3": "t_embedder", "flux": "time_in", "wan": "time_embedding",
                   "flux2": "time_in", "wan22_5b": "time_embedding"}
TSG_BRANCH_TAG = 2  # the first branch after cond (0) and uncond (1) in the step's batch: its noise key


def time_noised_reference(model, family: str, noise_scale: float, seed: int, window=None, base=None,
                          tag: int = TSG_BRANCH_TAG, scale_of_sigma=None):
    """TSG's negative (arXiv:2407.02687 §4): the cond pass with t_emb ↦ t_emb + s_n·std(t_emb)·n, the std per
    sample over the features, n ~ N(0, I) the core's keyed draw of (seed, step, branch tag), on the output of
    the module the host's forward takes the embedding from (TIME_EMBEDDINGS, read in the host's code)."""
    steps = {"count": -1}

    @contextlib.contextmanager
    def perturbed(diffusion_model, model_options):
        def add_noise(module, inputs, output):
            noise = keyed_normal(output.shape, seed, steps["count"], tag, device=output.device)
            spread = output.float().std(dim=tuple(range(1, output.ndim)), keepdim=True)
            return (output.float() + noise_scale * spread * noise).to(output.dtype)

        handle = getattr(diffusion_model, TIME_EMBEDDINGS[family]).register_forward_hook(add_noise)
        # The cond alone, as the host computes it: a ``base`` patched by the pack (PAG) would otherwise run its
        # own step (cond and its PAG branch) inside this pass; its patches do nothing without the step's routing.
        options = {key: value for key, value in model_options.items() if key != "sampler_calc_cond_batch_function"}
        options["transformer_options"] = {key: value for key, value in
                                          model_options.get("transformer_options", {}).items()
                                          if key != "comfyui_guiders"}
        try:
            yield options
        finally:
            handle.remove()

    reference = perturbed_pass_reference(base if base is not None else model, perturbed, SCALE)
    post_cfg = reference.model_options["sampler_post_cfg_function"][-1]

    def counted(args):
        steps["count"] += 1
        sigma = float(args["sigma"].flatten()[0])
        if window is not None and not window[1] <= sigma <= window[0]:
            return args["denoised"]
        return _at_scale(post_cfg(args), args["denoised"], scale_of_sigma, sigma)

    reference.model_options["sampler_post_cfg_function"][-1] = counted
    return reference


@pytest.mark.parametrize("family", ["sd15", "sd3", "flux", "wan", "flux2", "wan22_5b"])
def test_tsg_matches_time_noised_reference(guiders_pack, tiny_model, family) -> None:
    """GuidersTSG = plain CFG + s·(cond − cond at a noised time-step embedding).

    Breaks caught (each tried, every case fails): the noise added to every row, cond and uncond too; the noise
    not scaled by the embedding's std."""
    model = tiny_model(family)
    ours = node("GuidersTSG", model=model, scale=SCALE, noise_scale=1.0, start_percent=0.0, end_percent=1.0,
                seed=SEED)
    reference = time_noised_reference(model, family, 1.0, SEED)

    assert_parity(sample_family(ours, family), sample_family(reference, family), sample_family(model, family))


def test_tsg_window_and_forward_counts(guiders_pack, tiny_model) -> None:
    """Outside start..end the TSG term is off and its branch not evaluated; inside, one forward of batch 3.
    Break caught (tried): the window ignored by the node."""
    model = tiny_model("sd15")
    start, end = 0.0, 0.5
    assert_window_is_partial(model, start, end, STEPS)
    sampling = model.get_model_object("model_sampling")
    window = (float(sampling.percent_to_sigma(start)), float(sampling.percent_to_sigma(end)))
    ours = node("GuidersTSG", model=model, scale=SCALE, noise_scale=2.0, start_percent=start, end_percent=end,
                seed=SEED)
    with ForwardCounter(model) as counter:
        result = sample_family(ours, "sd15")
    assert_parity(result, sample_family(time_noised_reference(model, "sd15", 2.0, SEED, window=window), "sd15"),
                  sample_family(model, "sd15"))
    assert sorted({tuple(s) for s in counter.per_step()}) == [(2,), (3,)], counter.per_step()


def test_tsg_with_pag_shares_no_prefix_with_the_cond(guiders_pack, tiny_model) -> None:
    """With PAG on the middle block, the UNet's shared prefix computes equal chunks once up to it; TSG's branch
    differs from the cond from the time embedding on, so it must not share that prefix.
    Break caught (tried): shared_prefix.py's check for perturbations without layers removed (error 2e-1)."""
    model = tiny_model("sd15")
    pag = node("GuidersPAG", model=model, scale=2.0, layers="middle", start_percent=0.0, end_percent=1.0)
    ours = node("GuidersTSG", model=pag, scale=SCALE, noise_scale=1.0, start_percent=0.0, end_percent=1.0,
                seed=SEED)
    reference = time_noised_reference(model, "sd15", 1.0, SEED, base=pag, tag=3)  # PAG's branch is 2
    with ForwardCounter(model) as counter:
        result = sample_family(ours, "sd15")
    assert counter.per_step() == [[4]] * STEPS
    assert_parity(result, sample_family(reference, "sd15"), sample_family(pag, "sd15"))


def test_tsg_refuses_a_family_without_a_time_embedding_site(guiders_pack, tiny_model) -> None:
    with pytest.raises(Exception, match="no time-step embedding module"):
        node("GuidersTSG", model=tiny_model("hunyuan_video"), scale=SCALE, noise_scale=1.0, start_percent=0.0,
             end_percent=1.0)


# ---------------------------------------------------------------------------------------------------------
# ICG: CFG at an input-independent condition


def independent_condition_reference(model, seed: int, fixed: bool):
    """ICG (arXiv:2407.02687 §3): the uncond chunk's text embedding y replaced by std(y)·n, n ~ N(0, I) of y's
    shape from a generator of ``seed`` started with the run, drawn every step (or once: ``fixed``); the rest of
    CFG as the sampler does it. A model wrapper, as a user could write it, not the pack's conditioning path."""
    state: dict = {}

    def wrapper(apply_model, args):
        x, sigma, chunks = args["input"], args["timestep"], args["cond_or_uncond"]
        sigma_value = float(sigma.flatten()[0])
        if state.get("last_sigma") is None or sigma_value >= state["last_sigma"]:
            state["generator"], state["noise"] = torch.Generator().manual_seed(seed), None  # a new run
        state["last_sigma"] = sigma_value
        c = dict(args["c"])
        embeddings = c["c_crossattn"].clone()
        rows = embeddings.shape[0] // len(chunks)
        for j, chunk in enumerate(chunks):
            if chunk == 1:
                y = embeddings[j * rows:(j + 1) * rows]
                if state["noise"] is None or not fixed:
                    state["noise"] = torch.randn(y[:1].shape, generator=state["generator"])
                embeddings[j * rows:(j + 1) * rows] = (y.double().std() * state["noise"].double()).to(y.dtype)
        c["c_crossattn"] = embeddings
        return apply_model(x, sigma, **c)

    reference = model.clone()
    reference.set_model_unet_function_wrapper(wrapper)
    return reference


@pytest.mark.parametrize("family", ["sd15", "flux"])
@pytest.mark.parametrize("mode", ["per step", "fixed"])
def test_icg_matches_independent_condition_reference(guiders_pack, tiny_model, family, mode) -> None:
    """GuidersICG = CFG with the negative at std(y)·n. No extra branch: one forward of cond + uncond per step.

    Breaks caught (each tried, every case fails): the random condition given to the cond instead of the
    uncond; y's content kept (y + std(y)·n); the two modes swapped."""
    model = tiny_model(family)
    ours = node("GuidersICG", model=model, mode=mode, seed=SEED)
    reference = independent_condition_reference(model, SEED, mode == "fixed")
    with ForwardCounter(model) as counter:
        result = sample_family(ours, family)
    assert counter.per_step() == [[2]] * STEPS
    assert_parity(result, sample_family(reference, family), sample_family(model, family))


@pytest.mark.parametrize("node_id", ["GuidersTPG", "GuidersTSG"])
def test_schedule_drives_the_scale_per_step(guiders_pack, tiny_model, node_id) -> None:
    """With a GuidersScheduleLinear 5 → 1 the scale widget (9) is ignored and step i uses the schedule's s_i:
    equal to the reference at those scales. Break caught (tried): the schedule ignored (``perturbation_node``
    handed None for it in nodes/condition_free_nodes.py: the widget's 9 everywhere; both cases fail)."""
    model = tiny_model("sd15")
    schedule = node("GuidersScheduleLinear", start_value=5.0, end_value=1.0)
    per_step = linear_scale_per_step(model, 5.0, 1.0)
    inputs = {"model": model, "scale": 9.0, "start_percent": 0.0, "end_percent": 1.0, "seed": SEED,
              "schedule": schedule}
    if node_id == "GuidersTPG":
        ours = node(node_id, layers="input.3", **inputs)
        reference = tokens_shuffled_reference(model, "sd15", "input.3", SEED, scale_of_sigma=per_step)
        constant = tokens_shuffled_reference(model, "sd15", "input.3", SEED)
    else:
        ours = node(node_id, noise_scale=1.0, **inputs)
        reference = time_noised_reference(model, "sd15", 1.0, SEED, scale_of_sigma=per_step)
        constant = time_noised_reference(model, "sd15", 1.0, SEED)
    expected = sample_family(reference, "sd15")
    assert relative_error(expected, sample_family(constant, "sd15")) > 1e-3  # the schedule changes the reference
    assert_parity(sample_family(ours, "sd15"), expected, sample_family(model, "sd15"))
