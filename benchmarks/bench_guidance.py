"""What guidance costs on a real ComfyUI, on the CPU: this pack's batched PAG against ComfyUI's built-in
PerturbedAttentionGuidance and plain CFG on a UNet, its batched SLG against the built-in SkipLayerGuidanceSD3
and plain CFG on an SD3 MMDiT, and the forward calls every guidance node makes per step.

Run with the host's Python (no server starts, nothing is downloaded):

    ~/ComfyUI/.venv/bin/python benchmarks/bench_guidance.py [--steps 6] [--repeats 9] [--threads 1] [--only all]

The host is ``$COMFYUI_PATH`` or ``~/ComfyUI``. The models are the test suite's random-weight ones
(tests/host/tiny_models.py), loaded and sampled with the test harness (tests/host/harness.py), each on a
32x32 latent for the timings: a medium SD1.5-architecture UNet (model_channels 128, context 768) and a
medium SD3-architecture MMDiT (24 joint blocks as SD3 Medium, but hidden 128: 2 heads of 64). ``--only sd15``
or ``--only sd3`` runs one of the two parts (timings, floor and table rows of that model).

1. Timings, per model: its three set-ups run in turn (interleaved, the order rotating each repeat, so with a
   multiple of 3 repeats each set-up runs equally often first, second and third) so a change of load on the
   machine hits them alike. Each ratio is given as the median over repeats of the ratio within a repeat,
   with its range, and as best / best (the least disturbed run of each).
   SD1.5: plain CFG, built-in PAG and GuidersPAG (layers middle). GuidersPAG / built-in PAG should be <= 1.0
   (one call of batch 3 per step instead of calls of 2 and 1, whose input blocks run on cond and uncond
   only: the perturbed chunk shares the cond's prefix up to the middle block); GuidersPAG / plain CFG near
   1.5 means cost linear in branches, below it the shared prefix.
   SD3: plain CFG, built-in SkipLayerGuidanceSD3 and GuidersSLG (mode block), both on layers 7, 8, 9 with
   scale 3 at every step (start 0, end 1). Counted in block evaluations (a block run on one latent) per
   step: plain CFG 2·24 = 48; the built-in 2·24 in its CFG call plus 21 in its second call of batch 1 for
   the skip branch (blocks 7-9 are skipped, not run) = 69; GuidersSLG one call of batch 3 whose blocks 0-6
   run on cond and uncond only (the skip branch's chunk equals the cond's until block 7: the shared
   prefix), blocks 7-9 on cond and uncond only too (the skip chunk passes its inputs on without running
   them) and blocks 10-23 on all three = 2·7 + 2·3 + 3·14 = 62. So GuidersSLG / built-in SLG ≈ 62/69 =
   0.90 and GuidersSLG / plain CFG ≈ 62/48 = 1.29 from the blocks alone; batching one call of 3 instead
   of 2 + 1 (the floor below) brings it lower on this narrow model.
   NAG (``--only nag``): the medium SD1.5 at cfg 1 plain, with GuidersNAG (every cross-attention, one call
   of batch 1 per step: only the negative's extra attention), and plain CFG at 5 (one call of 2). Targets:
   GuidersNAG / plain cfg 1 <= 1.3, GuidersNAG at cfg 1 / plain CFG 5 <= 0.7 (the point of NAG). The same
   on a medium Wan 2.1 DiT (8 blocks, hidden 256, a text of 128 tokens: ``nag_dit_group``), and there, where
   the host has it (ComfyUI 0.33.0), ComfyUI's NAGuidance at cfg 1 (it forces the uncond pass).
2. The batching floor, per model: the bare model (no guidance code, no patches) evaluating cond, uncond and
   cond once as one batch of 3 and once as a batch of 2 and a batch of 1, interleaved the same way. Its
   ratio is what batching alone gives (about 1.0 where the model's work is linear in the batch; the narrow
   MMDiT gains from the larger batch): the distance from it to GuidersPAG / built-in PAG is what the
   shared prefix saves, less our overhead. For SD3 the built-in's batch of 1 skips 3 of 24 blocks, which
   the floor's does not.
3. A table of forward calls per step and their batch sizes for each node (harness.ForwardCounter), with the
   wall time per step (the median above for the timed set-ups, a single run for the others), and the model
   calls and latent evaluations per run: GuidersCFGInterval and GuidersAdaptiveCutoff against plain CFG (the
   uncond they skip), GuidersPerpNeg against ComfyUI's PerpNeg (the same three latents in one call or two).

Times are wall clock and this process's CPU time; on a machine other processes keep busy, the CPU-time
ratios are the ones to trust (the load average is printed at the start and the end). Nothing here is a
pass/fail check: the numbers are for reading. Peak memory per set-up on the CPU: bench_memory.py (one process
per set-up).

On an accelerator: ``--device cuda`` (NVIDIA, or AMD through ROCm) or ``--device mps`` (Apple) runs the same
comparisons there, with ``--dtype float16`` (default there) or ``bfloat16`` weights, and ``--size realistic``
for real latent sizes: SD1.5 64x64, an SDXL-architecture UNet (model_channels 128) at 128x128 and the medium
SD3 MMDiT at 64x64. Wall-time ratios are the ones to read there (the GPU's time is not this process's CPU time),
and on CUDA each set-up's peak ``torch.cuda.max_memory_allocated`` is printed. Without the accelerator the
script says so and exits 0; nothing is downloaded either way.
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

from bench_support import FLOOR_EVALUATIONS, Measured, accelerator_missing, locate_host, measure_floor, synchronize

REPO_ROOT = Path(__file__).resolve().parents[1]
HOST_TESTS = REPO_ROOT / "tests" / "host"
CFG = 5.0
SEED = 3


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=6, help="sampling steps per run (default 6)")
    parser.add_argument("--repeats", type=int, default=9,
                        help="timed repeats of each set-up (default 9: a multiple of 3 rotates the order evenly)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op threads, fixed for the whole run (default 1: on a shared 2-core "
                             "machine two threads made runs several times slower and much noisier)")
    parser.add_argument("--only", choices=("sd15", "sdxl", "sd3", "nag", "all"), default="all",
                        help="time only the SD1.5 UNet (PAG), the SDXL UNet (PAG), the SD3 MMDiT (SLG) or the NAG "
                             "(SD1.5 UNet at cfg 1) part (default all: SD1.5, SD3 and NAG, and SDXL with --size "
                             "realistic)")
    parser.add_argument("--device", choices=("cpu", "cuda", "mps"), default="cpu",
                        help="where to run (default cpu); cuda or mps exit 0 with a message when absent")
    parser.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), default=None,
                        help="the models' weights (default float32 on the CPU, float16 on an accelerator)")
    parser.add_argument("--size", choices=("small", "realistic"), default="small",
                        help="latent sides: small = 32 (default); realistic = SD1.5 64, SDXL 128, SD3 64")
    args = parser.parse_args()
    if args.dtype is None:
        args.dtype = "float32" if args.device == "cpu" else "float16"
    return args


# Latent side per model and --size: the CPU default (small) is what the README's numbers were measured at.
SIDES = {"small": {"sd15_medium": 32, "sdxl_medium": 32, "sd3_medium": 32, "wan_medium": 32},
         "realistic": {"sd15_medium": 64, "sdxl_medium": 128, "sd3_medium": 64, "wan_medium": 64}}


@dataclass
class Setup:
    """One row: a label, the model to sample and the models whose forwards to count (main first)."""

    label: str
    family: str
    model: object
    counted: tuple = ()
    cfg: float = CFG  # the sampler's cfg for this set-up (NAG's point is cfg 1)


@dataclass
class Group:
    """A model and the set-ups timed on it against each other (interleaved), with the ratios to print:
    (label, numerator set-up, denominator set-up, note)."""

    name: str
    title: str
    family: str
    model: object
    setups: list[Setup]
    ratios: list[tuple[str, str, str, str]]


def main() -> None:
    args = parse_args()
    missing = accelerator_missing(args.device)
    if missing:
        print(f"{missing}: nothing to benchmark on {args.device}. This machine has no such accelerator; run "
              f"'--device {args.device}' where one is (the CPU benchmark is the default, --device cpu).")
        return
    locate_host()
    sys.path.insert(0, str(HOST_TESTS))
    import harness  # needs COMFYUI_PATH, set above

    on_cpu = args.device == "cpu"
    harness.prepare_host_imports(cpu=on_cpu)
    import torch

    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    load_before = os.getloadavg()[0]
    host = harness.bootstrap(cpu=on_cpu)
    import comfy.model_management

    if comfy.model_management.get_torch_device().type != args.device:
        sys.exit(f"ComfyUI picked {comfy.model_management.get_torch_device()}, not {args.device}")
    harness.load_guiders_pack()
    import tiny_models

    tiny_models.INFERENCE_DTYPE = getattr(torch, args.dtype)
    run_node = harness.run_node
    sides = SIDES[args.size]
    inputs = {
        family: (*tiny_models.make_conditioning(family, seed=1),
                 tiny_models.make_latent(family, h=side, w=side, seed=2))
        for family, side in sides.items()
    }
    inputs["sd3"] = (*tiny_models.make_conditioning("sd3", seed=1), tiny_models.make_latent("sd3", seed=2))
    groups = []
    if args.only in ("sd15", "all"):
        medium = tiny_models.make_model("sd15_medium")
        (builtin_pag,) = run_node("PerturbedAttentionGuidance", model=medium, scale=3.0)  # attn1 of middle
        (guiders_pag,) = run_node("GuidersPAG", model=medium, scale=3.0, layers="middle")  # the same layer
        groups.append(Group(
            "SD1.5", "medium SD1.5: PAG on the middle block's self-attention", "sd15_medium", medium,
            [Setup("plain CFG", "sd15_medium", medium), Setup("built-in PAG", "sd15_medium", builtin_pag),
             Setup("GuidersPAG", "sd15_medium", guiders_pag)],
            [("GuidersPAG / built-in PAG", "GuidersPAG", "built-in PAG", "target <= 1.0"),
             ("GuidersPAG / plain CFG", "GuidersPAG", "plain CFG", "1.5 = linear in branches"),
             ("built-in PAG / plain CFG", "built-in PAG", "plain CFG", "for reference")]))
    if args.only == "sdxl" or (args.only == "all" and args.size == "realistic"):
        medium_sdxl = tiny_models.make_model("sdxl_medium")
        (builtin_pag_xl,) = run_node("PerturbedAttentionGuidance", model=medium_sdxl, scale=3.0)
        (guiders_pag_xl,) = run_node("GuidersPAG", model=medium_sdxl, scale=3.0, layers="middle")
        groups.append(Group(
            "SDXL", "medium SDXL: PAG on the middle block's self-attention", "sdxl_medium", medium_sdxl,
            [Setup("plain CFG (SDXL)", "sdxl_medium", medium_sdxl),
             Setup("built-in PAG (SDXL)", "sdxl_medium", builtin_pag_xl),
             Setup("GuidersPAG (SDXL)", "sdxl_medium", guiders_pag_xl)],
            [("GuidersPAG / built-in PAG (SDXL)", "GuidersPAG (SDXL)", "built-in PAG (SDXL)", "target <= 1.0"),
             ("GuidersPAG / plain CFG (SDXL)", "GuidersPAG (SDXL)", "plain CFG (SDXL)", "1.5 = linear in branches")]))
    if args.only in ("sd3", "all"):
        medium_sd3 = tiny_models.make_model("sd3_medium")
        window = {"scale": 3.0, "start_percent": 0.0, "end_percent": 1.0}  # every step
        (builtin_slg,) = run_node("SkipLayerGuidanceSD3", model=medium_sd3, layers="7, 8, 9", **window)
        (guiders_slg,) = run_node("GuidersSLG", model=medium_sd3, layers="7, 8, 9", mode="block", rescale=0.0,
                                  **window)
        groups.append(Group(
            "SD3", "medium SD3: SLG skipping joint blocks 7, 8, 9 (of 24)", "sd3_medium", medium_sd3,
            [Setup("plain CFG (SD3)", "sd3_medium", medium_sd3),
             Setup("built-in SLG (SD3)", "sd3_medium", builtin_slg),
             Setup("GuidersSLG (SD3)", "sd3_medium", guiders_slg)],
            [("GuidersSLG / built-in SLG (SD3)", "GuidersSLG (SD3)", "built-in SLG (SD3)",
              "62/69 = 0.90 in block evaluations"),
             ("GuidersSLG / plain CFG (SD3)", "GuidersSLG (SD3)", "plain CFG (SD3)", "62/48 = 1.29"),
             ("built-in SLG / plain CFG (SD3)", "built-in SLG (SD3)", "plain CFG (SD3)", "69/48 = 1.44")]))

    if args.only in ("nag", "all"):
        medium_nag = tiny_models.make_model("sd15_medium")
        nag_negative = tiny_models.make_conditioning("sd15_medium", seed=11)[0]
        (guiders_nag,) = run_node("GuidersNAG", model=medium_nag, negative=nag_negative, scale=4.0)  # every attn2
        groups.append(Group(
            "NAG", "medium SD1.5: NAG in every cross-attention at cfg 1, against cfg 1 and CFG 5", "sd15_medium",
            medium_nag,
            [Setup("plain cfg 1", "sd15_medium", medium_nag, cfg=1.0),
             Setup("GuidersNAG cfg 1", "sd15_medium", guiders_nag, cfg=1.0),
             Setup("plain CFG 5", "sd15_medium", medium_nag)],
            [("GuidersNAG cfg 1 / plain cfg 1", "GuidersNAG cfg 1", "plain cfg 1", "target <= 1.3"),
             ("GuidersNAG cfg 1 / plain CFG 5", "GuidersNAG cfg 1", "plain CFG 5", "target <= 0.7")]))
        groups.append(nag_dit_group(run_node, harness.bootstrap().nodes, tiny_models))

    print(f"ComfyUI {host.version} at {host.path}; torch {torch.__version__}, {torch.get_num_threads()} thread(s), "
          f"{os.cpu_count()} CPU(s), load average {load_before:.1f} at start")
    print(f"Device {comfy.model_management.get_torch_device()}"
          + (f" ({torch.cuda.get_device_name()})" if args.device == "cuda" else "")
          + f"; {args.dtype} weights; latent sizes: {args.size}")
    for group in groups:
        parameters = sum(p.numel() for p in group.model.model.diffusion_model.parameters()) / 1e6
        channels = tiny_models.family_spec(group.family).latent_channels
        architecture = {"SD1.5": "SD1.5-architecture UNet", "NAG": "SD1.5-architecture UNet",
                        "NAG DiT": "Wan 2.1-architecture DiT (8 blocks, hidden 256, a text of 128 tokens; 3 "
                                   "latent frames)",
                        "SDXL": "SDXL-architecture UNet",
                        "SD3": "SD3-architecture MMDiT (24 joint blocks)"}
        side = sides[group.family]
        print(f"Model ({group.name}): random-weight {architecture[group.name]}, {parameters:.1f} M parameters; "
              f"latent 1x{channels}x{side}x{side}")
    print(f"{args.steps} steps euler/normal; cfg {CFG}; {args.repeats} repeats\n")

    def run(setup: Setup, steps: int = args.steps, count: bool = False) -> Measured:
        positive, negative, latent = inputs[setup.family]
        gc.collect()
        if args.device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        with ExitStack() as stack:
            models = (setup.model, *setup.counted) if count else ()
            counters = [stack.enter_context(harness.ForwardCounter(m)) for m in models]
            synchronize(args.device)
            wall, cpu = time.perf_counter(), time.process_time()
            harness.sample(setup.model, positive, negative, latent, cfg=setup.cfg, steps=steps, seed=SEED)
            synchronize(args.device)
            wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        peak = torch.cuda.max_memory_allocated() / 2**20 if args.device == "cuda" else None
        return Measured(wall, cpu, counters, peak)

    # --- 1. timings, interleaved within each group ------------------------------------------------------
    measured: dict[str, list[Measured]] = {}
    for group in groups:
        timed = time_interleaved(group.setups, args.repeats, run)
        measured.update(timed)
        print(f"Timings, {group.title}")
        print("Time per run (s)      wall: median    min      max    CPU: median    min      max")
        for label, runs in timed.items():
            print_times(label, runs)
        if args.device == "cuda":
            print("Peak torch.cuda.max_memory_allocated per run (weights included), max over the runs:")
            for label, runs in timed.items():
                print(f"  {label:<18} {max(m.peak_mib for m in runs):10.0f} MiB")
        print("Ratios: median of the per-repeat ratios [min, max], then best / best; CPU = this process's CPU")
        print("time, which other processes on the machine disturb far less than wall time")
        for label, numerator, denominator, note in group.ratios:
            print_ratio(label, timed[numerator], timed[denominator], note)
        print()

    # --- 2. the batching floor: the bare model, batch 3 against batches 2 + 1 ----------------------------
    for group in [g for g in groups if not g.name.startswith("NAG")]:  # NAG: cfg 1, one chunk; no floor
        floor = measure_floor(group.model, inputs[group.family],
                              harness.scheduler_sigmas(group.model, steps=args.steps), args.repeats, args.device)
        print(f"Batching floor ({group.name}): the bare model (no guidance code) evaluating cond, uncond and cond "
              f"{FLOOR_EVALUATIONS} times per repeat")
        print("Time per repeat (s)   wall: median    min      max    CPU: median    min      max")
        for label, runs in floor.items():
            print_times(label, runs)
        print_ratio(f"one call / two calls ({group.name})", floor["one call (3)"], floor["two calls (2, 1)"],
                    "batching alone, with free guidance code and no shared prefix")
        print()

    # --- 3. forward calls per node -------------------------------------------------------------------
    rows = []
    for group in groups:
        rows += [(s, measured[s.label][-1], statistics.median(m.wall for m in measured[s.label]))
                 for s in group.setups]
        if group.name == "SD1.5":
            weak = tiny_models.make_model("sd15_medium", seed=1)  # same architecture, other weights
            empty_prompt = tiny_models.make_conditioning("sd15_medium", seed=12)[0]
            extra = table_setups(run_node, group.model, weak, args.steps, empty_prompt)
        elif group.name in ("SDXL", "NAG", "NAG DiT"):
            extra = []
        else:
            sd3 = tiny_models.make_model("sd3")
            (slg,) = run_node("GuidersSLG", model=sd3, scale=3.0, start_percent=0.0, end_percent=1.0)
            extra = [Setup("GuidersSLG (tiny SD3, window 0-1)", "sd3", slg)]
        for setup in extra:
            result = run(setup, count=True)
            rows.append((setup, result, result.wall))
    print(f"Forward calls per step ({args.steps} steps; batch size of each call, in order; "
          "'-' = no forward at that step)")
    print(f"  {'node':<42} {'calls per step':<26} {'forwards':>8} {'latents':>8} {'wall s/step':>12}")
    for setup, result, wall in rows:
        sigmas = harness.scheduler_sigmas(setup.model, steps=args.steps).cpu()
        calls = " + weak ".join(describe(by_step(counter, sigmas)) for counter in result.counters)
        forwards = sum(len(c.calls) for c in result.counters)
        latents = sum(sum(c.batch_sizes) for c in result.counters)
        print(f"  {setup.label:<42} {calls:<26} {forwards:>8} {latents:>8} {wall / args.steps:12.3f}")
    print("\n  forwards = model calls per run; latents = latent evaluations per run (sum of batch sizes).")
    print("  s/step: the timed set-ups (section 1) are the medians above, the others one run each (indicative")
    print("  only). The (SD3) rows are the medium SD3, the tiny SD3 row a tiny SD3 on an 8x8 latent, every")
    print("  other row the medium SD1.5, the (Wan) rows the medium Wan 2.1.")
    print(f"\nTotal benchmark time: {time.perf_counter() - started:.0f} s; load average {os.getloadavg()[0]:.1f} "
          "at the end")


def nag_dit_group(run_node, comfy_nodes, tiny_models) -> Group:
    """NAG on a medium cross-attention DiT (Wan 2.1) at cfg 1: GuidersNAG in every block's text cross_attn
    (one call of batch 1 per step; the negative's keys and values and one more attention per block), plain
    cfg 1 and plain CFG 5, and where the host has it ComfyUI's NAGuidance at cfg 1: it forces the uncond
    pass (one call of 2 per step), and on Wan its attn1 output patch is never called (WanModel calls no
    attn1_output_patch), so it is the cost of that forced pass with no NAG at all (reference doc §1.7)."""
    wan = tiny_models.make_wan_medium()
    negative = tiny_models.make_conditioning("wan_medium", seed=11)[0]
    (guiders_nag,) = run_node("GuidersNAG", model=wan, negative=negative, scale=4.0)  # every block's cross_attn
    setups = [Setup("plain cfg 1 (Wan)", "wan_medium", wan, cfg=1.0),
              Setup("GuidersNAG cfg 1 (Wan)", "wan_medium", guiders_nag, cfg=1.0),
              Setup("plain CFG 5 (Wan)", "wan_medium", wan)]
    ratios = [("GuidersNAG cfg 1 / plain cfg 1 (Wan)", "GuidersNAG cfg 1 (Wan)", "plain cfg 1 (Wan)", "target <= 1.3"),
              ("GuidersNAG cfg 1 / plain CFG 5 (Wan)", "GuidersNAG cfg 1 (Wan)", "plain CFG 5 (Wan)", "target <= 0.7")]
    if "NAGuidance" in comfy_nodes.NODE_CLASS_MAPPINGS:  # ComfyUI 0.33.0 (comfy_extras/nodes_nag.py)
        (builtin_nag,) = run_node("NAGuidance", model=wan, nag_scale=5.0, nag_alpha=0.5, nag_tau=1.5)
        setups.append(Setup("built-in NAGuidance cfg 1 (Wan)", "wan_medium", builtin_nag, cfg=1.0))
        ratios.append(("GuidersNAG / built-in NAGuidance, cfg 1 (Wan)", "GuidersNAG cfg 1 (Wan)",
                       "built-in NAGuidance cfg 1 (Wan)", "theirs forces the uncond; no NAG on Wan"))
        ratios.append(("built-in NAGuidance cfg 1 / plain cfg 1 (Wan)", "built-in NAGuidance cfg 1 (Wan)",
                       "plain cfg 1 (Wan)", "for reference"))
    else:
        print("This ComfyUI has no NAGuidance node (added after 0.8.0): the NAG DiT part runs without it.")
    return Group("NAG DiT", "medium Wan 2.1: NAG in every text cross-attention at cfg 1, against cfg 1, CFG 5 "
                 "and ComfyUI's NAGuidance", "wan_medium", wan, setups, ratios)


def time_interleaved(setups: list[Setup], repeats: int, run: Callable) -> dict[str, list[Measured]]:
    """Each set-up ``repeats`` times, in turn, the order rotating each repeat (with a multiple of
    len(setups) repeats, each set-up runs equally often in each place). A one-step run of each first keeps
    first-call allocations and lazy imports out of the measurement; the last repeat also counts forwards."""
    for setup in setups:
        run(setup, steps=1)
    measured: dict[str, list[Measured]] = {s.label: [] for s in setups}
    for repeat in range(repeats):
        order = setups[repeat % len(setups):] + setups[:repeat % len(setups)]
        for setup in order:
            measured[setup.label].append(run(setup, count=repeat == repeats - 1))
    return measured


def print_times(label: str, runs: list[Measured]) -> None:
    walls, cpus = [m.wall for m in runs], [m.cpu for m in runs]
    print(f"  {label:<18} {statistics.median(walls):14.3f} {min(walls):8.3f} {max(walls):8.3f}"
          f" {statistics.median(cpus):13.3f} {min(cpus):8.3f} {max(cpus):8.3f}")


def print_ratio(label: str, numerator: list[Measured], denominator: list[Measured], note: str) -> None:
    """Median of the per-repeat ratios [min, max], and best / best: the runs least disturbed by the rest of
    the machine, which is what the code itself costs if the disturbance only ever adds time."""
    parts = []
    for kind in ("wall", "cpu"):
        a, b = [getattr(m, kind) for m in numerator], [getattr(m, kind) for m in denominator]
        within = [x / y for x, y in zip(a, b, strict=True)]
        parts.append(f"{kind} {statistics.median(within):.3f} [{min(within):.3f}, {max(within):.3f}] "
                     f"best {min(a) / min(b):.3f}")
    print(f"  {label:<34} {'   '.join(parts)}   ({note})")


def table_setups(run_node: Callable, medium, weak, steps: int, empty_prompt: list) -> list[Setup]:
    (pag,) = run_node("GuidersPAG", model=medium, scale=3.0, layers="middle")
    (pag_seg,) = run_node("GuidersSEG", model=pag, scale=3.0)
    (sag,) = run_node("GuidersSAG", model=medium, scale=0.5)
    (builtin_sag,) = run_node("SelfAttentionGuidance", model=medium, scale=0.5, blur_sigma=2.0)
    (zero_star,) = run_node("GuidersCFGZeroStar", model=medium, zero_init_steps=1)
    values = [7.0] * (steps - steps // 3) + [1.0] * (steps // 3)  # the last third at exactly 1
    (schedule,) = run_node("GuidersScheduleCustom", values=", ".join(f"{v:g}" for v in values))
    (scheduled,) = run_node("GuidersScheduledCFG", model=medium, schedule=schedule)
    (autoguided,) = run_node("GuidersAutoguidance", model=medium, weak_model=weak, scale=2.0)
    schedule_text = ",".join(f"{v:g}" for v in values)
    # Issue #13's rules that change which branches a step evaluates: the uncond is skipped outside the interval,
    # and after the cut-off; Perp-Neg's empty prompt joins the batch (ComfyUI's PerpNeg makes a second call).
    (interval,) = run_node("GuidersCFGInterval", model=medium, mode="sigma", sigma_high=5.42, sigma_low=0.28)
    (cutoff,) = run_node("GuidersAdaptiveCutoff", model=medium, threshold=0.99)
    (perp_neg,) = run_node("GuidersPerpNeg", model=medium, empty_conditioning=empty_prompt, neg_scale=1.0)
    (builtin_perp_neg,) = run_node("PerpNeg", model=medium, empty_conditioning=empty_prompt, neg_scale=1.0)
    return [
        Setup("GuidersPAG + GuidersSEG", "sd15_medium", pag_seg),
        Setup("GuidersSAG", "sd15_medium", sag),
        Setup("built-in SelfAttentionGuidance", "sd15_medium", builtin_sag),
        Setup("GuidersCFGZeroStar (zero_init_steps 1)", "sd15_medium", zero_star),
        Setup(f"GuidersScheduledCFG ({schedule_text})", "sd15_medium", scheduled),
        Setup("GuidersAutoguidance (main + weak)", "sd15_medium", autoguided, counted=(weak,)),
        Setup("GuidersCFGInterval (sigma 0.28-5.42)", "sd15_medium", interval),
        Setup("GuidersAdaptiveCutoff (threshold 0.99)", "sd15_medium", cutoff),
        Setup("GuidersPerpNeg", "sd15_medium", perp_neg),
        Setup("built-in PerpNeg", "sd15_medium", builtin_perp_neg),
    ]


def by_step(counter, sigmas) -> list[list[int]]:
    """Batch sizes per sampling step. A call without a step (a model the sampler did not set up, such as
    autoguidance's weak model) is placed by its sigma."""
    import torch

    grouped: list[list[int]] = [[] for _ in range(len(sigmas) - 1)]
    for call in counter.calls:
        step = call.step
        if step is None:
            step = int(torch.argmin((sigmas.float() - call.sigma).abs()))
        grouped[min(step, len(grouped) - 1)].append(call.batch_size)
    return grouped


def describe(steps: list[list[int]]) -> str:
    """``[3]x6`` when every step is alike, else each step's calls in order (``- - [2] [2]``)."""
    shown = [("[" + ",".join(str(b) for b in calls) + "]") if calls else "-" for calls in steps]
    if len(set(shown)) == 1:
        return f"{shown[0]}x{len(shown)}"
    return " ".join(shown)


if __name__ == "__main__":
    main()
