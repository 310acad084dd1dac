"""The shared prefix (nodes/host/shared_prefix.py): in one forward, chunks with equal inputs (a perturbed branch
and the cond branch it perturbs) are computed once up to the first block a perturbation acts on, and each
takes a copy of that state from there. UNets: ``_shared_prefix_wrapper`` runs the forward; DiTs: the block
patch of every block before the last perturbed one (``_once_per_equal_chunk``).

What is checked, on a real ComfyUI sampling run: the batch each block computes (forward pre-hooks: on the
first layer of every UNet input, middle and output block; on every DiT block), and that the result equals
the same graph run with every chunk in every block, which this pack leaves to the host when another node
patches the model (a no-op ``input_block_patch`` on UNets, a no-op attention override on DiTs). A prefix
given to the wrong chunk, or shared one block too far, changes the result; a prefix not shared shows in
the batch sizes.

Host behaviour these tests depend on (ComfyUI 0.8.0): UNetModel._forward runs input blocks, the middle
block and output blocks through ``forward_timestep_embed``, which calls each block's layers in turn (so a
block's first layer sees the batch the block computes); DiT blocks are modules called once per forward,
through their ``dit`` replace patch when one is set.
"""

from __future__ import annotations

from contextlib import contextmanager

import pytest
import torch
from harness import run_node, sample
from tiny_models import make_conditioning, make_controlnet, make_latent

STEPS = 3
# Of max|host result|: the shared prefix computes the equal chunks in a smaller batch, which CPU kernels may
# sum in another order (measured up to 4e-6 here); a prefix taken from the wrong chunk is off by the
# branch's whole effect (over 1e-2).
RTOL = 1e-4


def assert_same_result(shared: torch.Tensor, host: torch.Tensor) -> None:
    error = float((shared - host).abs().max() / host.abs().max())
    assert error < RTOL, f"max|shared − host forward| / max|host forward| = {error:.2e}"


@contextmanager
def call_batches(modules: list[torch.nn.Module]):
    """Records the batch each of ``modules`` is called with (its first tensor argument), one list per pass
    through all of them (one per forward): yields the list of those lists, filled on exit."""
    sizes: list[int] = []

    def record(_module, args, kwargs):
        sizes.append(next(int(v.shape[0]) for v in (*args, *kwargs.values()) if isinstance(v, torch.Tensor)))

    handles = [module.register_forward_pre_hook(record, with_kwargs=True) for module in modules]
    per_forward: list[list[int]] = []
    try:
        yield per_forward
    finally:
        for handle in handles:
            handle.remove()
        per_forward.extend(sizes[i:i + len(modules)] for i in range(0, len(sizes), len(modules)))


def unet_blocks(model) -> list[torch.nn.Module]:
    """The first layer of every UNet block (input blocks, middle, output blocks, in forward order): the
    layer that sees the batch its block computes."""
    unet = model.model.diffusion_model
    return [block[0] for block in (*unet.input_blocks, unet.middle_block, *unet.output_blocks)]


def host_forward(model):
    """A clone on which another node's (no-op) patch leaves every forward to the host's UNet forward."""
    patched = model.clone()
    patched.set_model_input_block_patch(lambda h, transformer_options: h)
    return patched


def run(model, family: str, cfg: float = 5.0, batch: int = 1, conds: tuple | None = None):
    positive, negative = conds or make_conditioning(family, batch=batch, seed=1)
    latent = make_latent(family, batch=batch, seed=2)
    with call_batches(unet_blocks(model)) as batches:
        out = sample(model, positive, negative, latent, cfg=cfg, steps=STEPS, seed=3)
    return out, batches


def apply(model, *nodes: tuple[str, dict]):
    for node_id, inputs in nodes:
        (model,) = run_node(node_id, model=model, **inputs)
    return model


def block_positions(model) -> dict[str, int]:
    unet = model.model.diffusion_model
    names = ([f"input.{i}" for i in range(len(unet.input_blocks))] + ["middle"]
             + [f"output.{i}" for i in range(len(unet.output_blocks))])
    return {name: position for position, name in enumerate(names)}


PAG_MIDDLE = ("GuidersPAG", {"scale": 3.0, "layers": "middle"})
# (family, the nodes, KSampler cfg, latent batch, the first block the perturbed chunk computes on its own,
#  the batch before it, the batch from it)
CASES = [
    pytest.param("sd15", [PAG_MIDDLE], 5.0, 1, "middle", 2, 3, id="pag-middle"),
    pytest.param("sd15", [("GuidersPAG", {"scale": 3.0, "layers": "input.3"})], 5.0, 1, "input.3", 2, 3,
                 id="pag-input.3"),
    pytest.param("sd15", [("GuidersPAG", {"scale": 3.0, "layers": "output.1"})], 5.0, 1, "output.1", 2, 3,
                 id="pag-output.1"),
    pytest.param("sd15", [PAG_MIDDLE, ("GuidersSEG", {"scale": 3.0, "layers": "input.1"})], 5.0, 1, "input.1", 2,
                 4, id="pag-middle+seg-input.1"),
    pytest.param("sd15", [PAG_MIDDLE], 1.0, 1, "middle", 1, 2, id="pag-cfg1"),
    pytest.param("sd15", [PAG_MIDDLE], 5.0, 2, "middle", 4, 6, id="pag-latent-batch-2"),
    pytest.param("sdxl", [PAG_MIDDLE], 5.0, 1, "middle", 2, 3, id="sdxl-pag-middle"),
    # SAG watches the uncond's middle block inside the shared prefix, where the chunks are (cond, uncond).
    pytest.param("sd15", [("GuidersSAG", {"scale": 0.5, "blur_sigma": 2.0}),
                          ("GuidersPAG", {"scale": 3.0, "layers": "output.1"})], 5.0, 1, "output.1", 2, 3,
                 id="sag+pag-output.1"),
]


@pytest.mark.parametrize(("family", "nodes", "cfg", "batch", "split", "before", "after"), CASES)
def test_equal_chunks_share_the_blocks_before_the_first_perturbed_one(
    guiders_pack, tiny_model, family: str, nodes: list, cfg: float, batch: int, split: str, before: int, after: int
) -> None:
    model = tiny_model(family)
    shared, batches = run(apply(model, *nodes), family, cfg, batch)
    unshared, host_batches = run(apply(host_forward(model), *nodes), family, cfg, batch)
    plain, _ = run(model, family, cfg, batch)

    positions = block_positions(model)
    expected = [before] * positions[split] + [after] * (len(positions) - positions[split])
    main_forwards = [sizes for sizes in batches if sizes[-1] == after]  # not SAG's degraded-uncond call
    assert main_forwards == [expected] * STEPS
    assert [sizes for sizes in host_batches if sizes[-1] == after] == [[after] * len(positions)] * STEPS
    assert_same_result(shared, unshared)
    assert float((shared - plain).abs().max() / plain.abs().max()) > 1e-2  # the branch's guidance is there


@pytest.mark.parametrize("nodes", [
    pytest.param([("GuidersSAG", {"scale": 0.5, "blur_sigma": 2.0})], id="sag"),
    pytest.param([("GuidersPAG", {"scale": 3.0, "layers": "middle", "target": "negative branch"})],
                 id="pag-on-the-negative-branch"),
])
def test_no_chunk_is_dropped_when_none_equals_another(guiders_pack, sd15_model, nodes: list) -> None:
    # SAG watches the uncond chunk and PAG on the negative branch perturbs it: the call holds cond and
    # uncond, which differ, so every block computes both.
    out, batches = run(apply(sd15_model, *nodes), "sd15")
    host, _ = run(apply(host_forward(sd15_model), *nodes), "sd15")

    main_forwards = [sizes for sizes in batches if sizes[0] == 2]  # SAG's degraded uncond is its own call
    assert len(main_forwards) == STEPS and all(sizes == [2] * len(sizes) for sizes in main_forwards)
    assert_same_result(out, host)


def test_another_nodes_block_patch_leaves_the_forward_to_the_host(guiders_pack, sd15_model) -> None:
    # FreeU_V2 patches the output blocks' skip connections: the host's forward runs, on every chunk, and
    # FreeU's change is still in the result.
    (freeu,) = run_node("FreeU_V2", model=sd15_model, b1=1.3, b2=1.4, s1=0.9, s2=0.2)
    (freeu_pag,) = run_node("GuidersPAG", model=freeu, scale=3.0, layers="middle")
    (pag,) = run_node("GuidersPAG", model=sd15_model, scale=3.0, layers="middle")

    out, batches = run(freeu_pag, "sd15")
    without_freeu, _ = run(pag, "sd15")

    assert batches == [[3] * len(block_positions(sd15_model))] * STEPS
    assert float((out - without_freeu).abs().max() / without_freeu.abs().max()) > 1e-2


def plain_attention(q, k, v, extra_options):
    import comfy.ldm.modules.attention as attention

    return attention.optimized_attention(q, k, v, extra_options["n_heads"])


# Patches of other nodes that could treat chunks by their cond_or_uncond tag (these ones do nothing).
OTHER_NODES_PATCHES = {
    "attn2-replace": lambda m: m.set_model_attn2_replace(plain_attention, "input", 1),
    "attn1-replace-on-another-layer": lambda m: m.set_model_attn1_replace(plain_attention, "output", 3),
    "attention-override": lambda m: m.model_options.setdefault("transformer_options", {}).__setitem__(
        "optimized_attention_override", lambda func, *args, **kwargs: func(*args, **kwargs)),
}


@pytest.mark.parametrize("patch", OTHER_NODES_PATCHES.values(), ids=OTHER_NODES_PATCHES.keys())
def test_another_nodes_attention_patch_leaves_the_forward_to_the_host(guiders_pack, sd15_model, patch) -> None:
    other = sd15_model.clone()
    patch(other)
    (pag_after_other,) = run_node("GuidersPAG", model=other, scale=3.0, layers="middle")
    (pag,) = run_node("GuidersPAG", model=sd15_model, scale=3.0, layers="middle")

    out, batches = run(pag_after_other, "sd15")
    alone, _ = run(pag, "sd15")

    assert batches == [[3] * len(block_positions(sd15_model))] * STEPS
    assert_same_result(out, alone)


def test_another_nodes_diffusion_model_wrapper_inside_ours_still_runs(guiders_pack, sd15_model) -> None:
    import comfy.patcher_extension

    (pag,) = run_node("GuidersPAG", model=sd15_model, scale=3.0, layers="middle")
    wrapped = pag.clone()
    calls = []

    def counting_wrapper(executor, *args, **kwargs):  # added after ours: the host calls it inside ours
        calls.append(args[0].shape[0])
        return executor(*args, **kwargs)

    wrapped.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, "test", counting_wrapper)
    _, batches = run(wrapped, "sd15")

    assert calls == [3] * STEPS
    assert batches == [[3] * len(block_positions(sd15_model))] * STEPS


def test_a_controlnet_leaves_the_forward_to_the_host_and_pag_still_matches_the_builtin(guiders_pack,
                                                                                       sd15_model) -> None:
    # ControlNet residuals are added per chunk inside the host's forward: every chunk runs, and GuidersPAG
    # under ControlNet still matches ComfyUI's PerturbedAttentionGuidance under the same ControlNet.
    positive, negative = make_conditioning("sd15", seed=1)
    hint = torch.rand(1, 64, 64, 3, generator=torch.Generator().manual_seed(4))  # an 8x8 latent's image
    controlled = run_node("ControlNetApplyAdvanced", positive=positive, negative=negative,
                          control_net=make_controlnet(sd15_model), image=hint, strength=0.5, start_percent=0.0,
                          end_percent=1.0)
    (ours,) = run_node("GuidersPAG", model=sd15_model, scale=3.0, layers="middle")
    (builtin,) = run_node("PerturbedAttentionGuidance", model=sd15_model, scale=3.0)

    out, batches = run(ours, "sd15", conds=controlled)
    reference, _ = run(builtin, "sd15", conds=controlled)
    without_control, _ = run(ours, "sd15")

    assert batches == [[3] * len(block_positions(sd15_model))] * STEPS
    assert_same_result(out, reference)
    assert float((out - without_control).abs().max() / out.abs().max()) > 1e-2  # the ControlNet acted


# ---------------------------------------------------------------------------------------------------------
# DiTs: every block before the last perturbed one computes equal chunks once

DIT_BLOCK_LISTS = {"sd3": ("joint_blocks",), "flux": ("double_blocks", "single_blocks"), "wan": ("blocks",),
                   "ltxv": ("transformer_blocks",), "hunyuan_video": ("double_blocks", "single_blocks")}


def dit_blocks(model, family: str) -> list[torch.nn.Module]:
    """A DiT's blocks in forward order (double or main blocks, then single ones)."""
    dm = model.model.diffusion_model
    return [block for name in DIT_BLOCK_LISTS[family] for block in getattr(dm, name)]


def run_dit(model, family: str):
    positive, negative = make_conditioning(family, seed=1)
    latent = make_latent(family, seed=2)
    with call_batches(dit_blocks(model, family)) as batches:
        out = sample(model, positive, negative, latent, cfg=5.0, steps=STEPS, seed=3)
    return out, batches


def other_attention_override(model):
    """A clone with another node's (no-op) attention override: every chunk then runs in every block."""
    other = model.clone()
    other.model_options.setdefault("transformer_options", {})["optimized_attention_override"] = (
        lambda func, *args, **kwargs: func(*args, **kwargs))
    return other


def pag(layers: str) -> tuple[str, dict]:
    return "GuidersPAG", {"scale": 3.0, "layers": layers}


def slg(layers: str, mode: str = "block") -> tuple[str, dict]:
    return "GuidersSLG", {"scale": 3.0, "layers": layers, "mode": mode, "start_percent": 0.0, "end_percent": 1.0}


# (family, nodes, the batch each block computes in forward order, the call's batch). The call holds cond,
# uncond and one chunk per branch; a perturbed branch's chunk equals the cond's up to its first perturbed
# block. A block that SLG's block mode skips for a chunk is not computed for it at all.
DIT_CASES = [
    pytest.param("sd3", [pag("1")], [2, 3], 3, id="sd3-pag-1"),
    pytest.param("sd3", [slg("1")], [2, 2], 3, id="sd3-slg-1"),
    pytest.param("flux", [pag("double.1")], [2, 3, 3, 3], 3, id="flux-pag-double.1"),
    pytest.param("flux", [slg("single.1")], [2, 2, 2, 2], 3, id="flux-slg-single.1"),
    pytest.param("flux", [slg("double.1", "attention")], [2, 3, 3, 3], 3, id="flux-slg-attention-double.1"),
    # PAG leaves the cond at double.0; SLG's chunk still equals the cond until single.1, which skips it.
    pytest.param("flux", [pag("double.0"), slg("single.1")], [4, 3, 3, 3], 4, id="flux-pag-double.0+slg-single.1"),
    pytest.param("wan", [pag("2")], [2, 2, 3], 3, id="wan-pag-2"),
    pytest.param("wan", [slg("1")], [2, 2, 3], 3, id="wan-slg-1"),
    pytest.param("ltxv", [slg("2", "attention")], [2, 2, 3], 3, id="ltxv-stg-attention-2"),
    pytest.param("hunyuan_video", [pag("single.0")], [2, 2, 3, 3], 3, id="hunyuan-pag-single.0"),
]


@pytest.mark.parametrize(("family", "nodes", "expected", "call_batch"), DIT_CASES)
def test_dit_blocks_compute_equal_chunks_once_until_they_part(guiders_pack, tiny_model, family: str, nodes: list,
                                                              expected: list[int], call_batch: int) -> None:
    model = tiny_model(family)
    shared, batches = run_dit(apply(model, *nodes), family)
    unshared, host_batches = run_dit(apply(other_attention_override(model), *nodes), family)
    plain, _ = run_dit(model, family)

    assert batches == [expected] * STEPS
    assert host_batches == [[call_batch] * len(expected)] * STEPS
    assert_same_result(shared, unshared)
    assert float((shared - plain).abs().max() / plain.abs().max()) > 1e-2


def test_another_nodes_dit_block_patch_leaves_every_block_to_every_chunk(guiders_pack, flux_model) -> None:
    # A block patch of another node (here a pass-through on double block 0) may treat chunks by their tag.
    other = flux_model.clone()
    other.set_model_patch_replace(lambda args, extra: extra["original_block"](args), "dit", "double_block", 0)
    (ours,) = run_node("GuidersPAG", model=other, scale=3.0, layers="single.1")
    (alone,) = run_node("GuidersPAG", model=flux_model, scale=3.0, layers="single.1")

    out, batches = run_dit(ours, "flux")
    shared, shared_batches = run_dit(alone, "flux")

    assert batches == [[3, 3, 3, 3]] * STEPS and shared_batches == [[2, 2, 2, 3]] * STEPS
    assert_same_result(out, shared)


def shared_prefix_module(guiders_pack):
    import sys

    return sys.modules[guiders_pack["GuidersPAG"].__module__.rsplit(".", 1)[0] + ".host.shared_prefix"]


def test_the_hosts_unet_forward_is_one_the_shared_prefix_was_checked_against(guiders_pack) -> None:
    # If this fails, ComfyUI's UNetModel._forward changed: compare its loop with _unet_forward_shared, then add
    # the new fingerprint to VERIFIED_UNET_FORWARD_SOURCES.
    module = shared_prefix_module(guiders_pack)
    assert module.host_forward_is_verified(), module.unet_forward_fingerprint()


def test_an_unverified_unet_forward_leaves_the_forward_to_the_host(guiders_pack, sd15_model, monkeypatch) -> None:
    # A ComfyUI whose UNetModel._forward changed: every block computes every chunk, and the result is the
    # host's. Catches a shared prefix that runs on a forward loop nobody checked.
    module = shared_prefix_module(guiders_pack)
    monkeypatch.setattr(module, "VERIFIED_UNET_FORWARD_SOURCES", frozenset())
    (pag,) = run_node("GuidersPAG", model=sd15_model, scale=3.0, layers="middle")
    out, batches = run(pag, "sd15")
    monkeypatch.undo()
    shared, shared_batches = run(pag, "sd15")

    assert batches == [[3] * len(block_positions(sd15_model))] * STEPS
    assert shared_batches != batches  # the verified forward does share the prefix
    assert_same_result(out, shared)
