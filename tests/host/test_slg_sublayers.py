"""GuidersSLG's ``attention`` and ``feedforward`` modes: inside the chosen DiT block, that sublayer adds
nothing for the perturbed branch (its residual passes through), batched with cond and uncond.

The reference is written from that definition: an extra cond pass, run alone, with forward hooks that
zero the sublayer modules' outputs, added after CFG as s·(cond − perturbed)."""

from __future__ import annotations

import pytest
import torch
from harness import ForwardCounter, run_node, sample
from references import modules_return, perturbed_pass_reference
from tiny_models import make_conditioning, make_latent

CFG, SCALE = 5.0, 3.0

# family, layer widget, block list, block index, module names per mode (the tiny SD3's last joint block has
# no context-stream projection, so block 0 is used there).
CASES = [
    ("sd3", "0", "joint_blocks", 0, {"attention": ["context_block.attn.proj", "x_block.attn.proj"],
                                     "feedforward": ["context_block.mlp", "x_block.mlp"]}),
    ("flux", "double.1", "double_blocks", 1, {"attention": ["img_attn.proj", "txt_attn.proj"],
                                              "feedforward": ["img_mlp", "txt_mlp"]}),
    ("wan", "1", "blocks", 1, {"attention": ["self_attn.o"], "feedforward": ["ffn"]}),
    ("ltxv", "1", "transformer_blocks", 1, {"attention": ["attn1.to_out"], "feedforward": ["ff"]}),
    ("hunyuan_video", "double.1", "double_blocks", 1, {"attention": ["img_attn.proj", "txt_attn.proj"],
                                                       "feedforward": ["img_mlp", "txt_mlp"]}),
]


def sublayer_off_reference(model, block, module_names, scale):
    """The extra cond pass with the sublayer modules' outputs zeroed, added after CFG (references.py)."""
    modules = [block.get_submodule(name) for name in module_names]
    return perturbed_pass_reference(model, modules_return(lambda dm: modules, lambda m, x, out: torch.zeros_like(out)),
                                    scale)


def run(model, family):
    positive, negative = make_conditioning(family)
    return sample(model, positive, negative, make_latent(family, seed=1), cfg=CFG)


@pytest.mark.parametrize("mode", ["attention", "feedforward"])
@pytest.mark.parametrize(("family", "layers", "block_list", "index", "modules"), CASES, ids=[c[0] for c in CASES])
def test_sublayer_skip_matches_its_definition(guiders_pack, tiny_model, family, layers, block_list, index, modules,
                                              mode) -> None:
    model = tiny_model(family)
    block = getattr(model.model.diffusion_model, block_list)[index]
    (ours,) = run_node("GuidersSLG", model=model, scale=SCALE, layers=layers, mode=mode, start_percent=0.0,
                       end_percent=1.0, rescale=0.0)
    with ForwardCounter(model) as counter:
        result = run(ours, family)
    reference = run(sublayer_off_reference(model, block, modules[mode], SCALE), family)
    plain = run(model, family)

    assert all(step == [3] for step in counter.per_step()), counter.per_step()
    assert (reference - plain).abs().max() / plain.abs().max() > 1e-2, "the reference must change the result"
    assert (result - reference).abs().max() / reference.abs().max() < 1e-4
    assert not block.get_submodule(modules[mode][0])._forward_hooks, "hooks must not outlive the call"


@pytest.mark.parametrize("family", ["flux", "hunyuan_video"])
def test_fused_single_blocks_cannot_skip_one_sublayer(guiders_pack, tiny_model, family) -> None:
    with pytest.raises(ValueError, match=r"single\.1.*use mode 'block'"):
        run_node("GuidersSLG", model=tiny_model(family), scale=SCALE, layers="single.1", mode="attention",
                 start_percent=0.0, end_percent=1.0, rescale=0.0)
