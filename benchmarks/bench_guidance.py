"""What guidance costs on a real ComfyUI, on the CPU: this pack's batched PAG against ComfyUI's built-in
PerturbedAttentionGuidance and plain CFG, and the forward calls every guidance node makes per step.

Run with the host's Python (no server starts, nothing is downloaded):

    ~/ComfyUI/.venv/bin/python benchmarks/bench_guidance.py [--steps 6] [--repeats 4] [--threads 1]

The host is ``$COMFYUI_PATH`` or ``~/ComfyUI``. The models are the test suite's random-weight ones
(tests/host/tiny_models.py), loaded and sampled with the test harness (tests/host/harness.py): a
medium SD1.5-architecture UNet (model_channels 128, context 768) on a 32x32 latent for the timings.

1. Timings: the three set-ups run in turn (interleaved, the order rotating each repeat) so a change of load
   on the machine hits them alike; each ratio is the median over repeats of the ratio within a repeat.
   GuidersPAG / built-in PAG should be <= 1.0 (one call of batch 3 per step instead of calls of 2 and 1);
   GuidersPAG / plain CFG near 1.5 means cost linear in branches.
2. A table of forward calls per step and their batch sizes for each node (harness.ForwardCounter), with the
   wall time per step (the median above for the timed set-ups, a single run for the others).

Times are wall clock and this process's CPU time; on a machine other processes keep busy, the CPU-time
ratios are the ones to trust (the load average is printed at the start and the end).
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

REPO_ROOT = Path(__file__).resolve().parents[1]
HOST_TESTS = REPO_ROOT / "tests" / "host"
CFG = 5.0
SEED = 3


def locate_host() -> Path:
    host = Path(os.environ.get("COMFYUI_PATH") or "~/ComfyUI").expanduser().resolve()
    if not (host / "comfy" / "samplers.py").is_file():
        sys.exit(f"No ComfyUI at {host}: set COMFYUI_PATH to a ComfyUI checkout.")
    os.environ["COMFYUI_PATH"] = str(host)  # what harness.host_path() reads
    return host


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=6, help="sampling steps per run (default 6)")
    parser.add_argument("--repeats", type=int, default=4, help="timed repeats of each set-up (default 4)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op threads, fixed for the whole run (default 1: on a shared 2-core "
                             "machine two threads made runs several times slower and much noisier)")
    return parser.parse_args()


@dataclass
class Setup:
    """One row: a label, the model to sample and the models whose forwards to count (main first)."""

    label: str
    family: str
    model: object
    counted: tuple = ()


def main() -> None:
    args = parse_args()
    locate_host()
    sys.path.insert(0, str(HOST_TESTS))
    import harness  # needs COMFYUI_PATH, set above

    harness.prepare_host_imports()
    import torch

    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    load_before = os.getloadavg()[0]
    host = harness.bootstrap()
    harness.load_guiders_pack()
    import tiny_models

    run_node = harness.run_node
    medium = tiny_models.make_model("sd15_medium")
    side = tiny_models.MEDIUM_LATENT_SIZE
    inputs = {
        "sd15_medium": (*tiny_models.make_conditioning("sd15_medium", seed=1),
                        tiny_models.make_latent("sd15_medium", h=side, w=side, seed=2)),
        "sd3": (*tiny_models.make_conditioning("sd3", seed=1), tiny_models.make_latent("sd3", seed=2)),
    }
    parameters = sum(p.numel() for p in medium.model.diffusion_model.parameters())
    print(f"ComfyUI {host.version} at {host.path}; torch {torch.__version__}, {torch.get_num_threads()} thread(s), "
          f"{os.cpu_count()} CPU(s), load average {load_before:.1f} at start")
    print(f"Model: random-weight SD1.5-architecture UNet, {parameters / 1e6:.1f} M parameters; "
          f"latent 1x4x{side}x{side}; {args.steps} steps euler/normal; cfg {CFG}; {args.repeats} repeats\n")

    def run(setup: Setup, steps: int = args.steps, count: bool = False) -> Measured:
        positive, negative, latent = inputs[setup.family]
        gc.collect()
        with ExitStack() as stack:
            models = (setup.model, *setup.counted) if count else ()
            counters = [stack.enter_context(harness.ForwardCounter(m)) for m in models]
            wall, cpu = time.perf_counter(), time.process_time()
            harness.sample(setup.model, positive, negative, latent, cfg=CFG, steps=steps, seed=SEED)
            wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        return Measured(wall, cpu, counters)

    # --- 1. timings, interleaved --------------------------------------------------------------------
    (builtin_pag,) = run_node("PerturbedAttentionGuidance", model=medium, scale=3.0)  # attn1 of middle
    (guiders_pag,) = run_node("GuidersPAG", model=medium, scale=3.0, layers="middle")  # the same layer
    timed = [Setup("plain CFG", "sd15_medium", medium), Setup("built-in PAG", "sd15_medium", builtin_pag),
             Setup("GuidersPAG", "sd15_medium", guiders_pag)]
    for setup in timed:  # warm-up: first-call allocations and lazy imports stay out of the measurement
        run(setup, steps=1)
    measured: dict[str, list[Measured]] = {s.label: [] for s in timed}
    for repeat in range(args.repeats):
        order = timed[repeat % len(timed):] + timed[:repeat % len(timed)]
        for setup in order:  # the last repeat also counts forwards, for the table
            measured[setup.label].append(run(setup, count=repeat == args.repeats - 1))

    print("Time per run (s)      wall: median    min      max    CPU: median    min      max")
    for label, runs in measured.items():
        walls, cpus = [m.wall for m in runs], [m.cpu for m in runs]
        print(f"  {label:<18} {statistics.median(walls):14.3f} {min(walls):8.3f} {max(walls):8.3f}"
              f" {statistics.median(cpus):13.3f} {min(cpus):8.3f} {max(cpus):8.3f}")

    print("\nRatios: median of the per-repeat ratios [min, max]; CPU = this process's CPU time, which other")
    print("processes on the machine disturb far less than wall time")
    for numerator, denominator, note in (
        ("GuidersPAG", "built-in PAG", "target <= 1.0"),
        ("GuidersPAG", "plain CFG", "1.5 = linear in branches"),
        ("built-in PAG", "plain CFG", "for reference"),
    ):
        parts = []
        for kind in ("wall", "cpu"):
            within = [getattr(a, kind) / getattr(b, kind)
                      for a, b in zip(measured[numerator], measured[denominator], strict=True)]
            parts.append(f"{kind} {statistics.median(within):.3f} [{min(within):.3f}, {max(within):.3f}]")
        print(f"  {numerator + ' / ' + denominator:<28} {'   '.join(parts)}   ({note})")

    # --- 2. forward calls per node -------------------------------------------------------------------
    sd3 = tiny_models.make_model("sd3")
    weak = tiny_models.make_model("sd15_medium", seed=1)  # same architecture, other weights
    rows = [(s, measured[s.label][-1], statistics.median(m.wall for m in measured[s.label])) for s in timed]
    for setup in table_setups(run_node, medium, weak, sd3, args.steps):
        result = run(setup, count=True)
        rows.append((setup, result, result.wall))
    print(f"\nForward calls per step ({args.steps} steps; batch size of each call, in order; "
          "'-' = no forward at that step)")
    print(f"  {'node':<42} {'calls per step':<26} {'forwards':>8} {'latents':>8} {'wall s/step':>12}")
    for setup, result, wall in rows:
        sigmas = harness.scheduler_sigmas(setup.model, steps=args.steps)
        calls = " + weak ".join(describe(by_step(counter, sigmas)) for counter in result.counters)
        forwards = sum(len(c.calls) for c in result.counters)
        latents = sum(sum(c.batch_sizes) for c in result.counters)
        print(f"  {setup.label:<42} {calls:<26} {forwards:>8} {latents:>8} {wall / args.steps:12.3f}")
    print("\n  forwards = model calls per run; latents = latent evaluations per run (sum of batch sizes).")
    print("  s/step: the first three rows are the medians above, the others one run each (indicative only);")
    print("  the SLG row is a tiny SD3 on an 8x8 latent, every other row the medium SD1.5 above.")
    print(f"\nTotal benchmark time: {time.perf_counter() - started:.0f} s; load average {os.getloadavg()[0]:.1f} "
          "at the end")


@dataclass
class Measured:
    wall: float
    cpu: float
    counters: list


def table_setups(run_node: Callable, medium, weak, sd3, steps: int) -> list[Setup]:
    (pag,) = run_node("GuidersPAG", model=medium, scale=3.0, layers="middle")
    (pag_seg,) = run_node("GuidersSEG", model=pag, scale=3.0)
    (sag,) = run_node("GuidersSAG", model=medium, scale=0.5)
    (builtin_sag,) = run_node("SelfAttentionGuidance", model=medium, scale=0.5, blur_sigma=2.0)
    (slg,) = run_node("GuidersSLG", model=sd3, scale=3.0, start_percent=0.0, end_percent=1.0)
    (zero_star,) = run_node("GuidersCFGZeroStar", model=medium, zero_init_steps=1)
    values = [7.0] * (steps - steps // 3) + [1.0] * (steps // 3)  # the last third at exactly 1
    (schedule,) = run_node("GuidersScheduleCustom", values=", ".join(f"{v:g}" for v in values))
    (scheduled,) = run_node("GuidersScheduledCFG", model=medium, schedule=schedule)
    (autoguided,) = run_node("GuidersAutoguidance", model=medium, weak_model=weak, scale=2.0)
    schedule_text = ",".join(f"{v:g}" for v in values)
    return [
        Setup("GuidersPAG + GuidersSEG", "sd15_medium", pag_seg),
        Setup("GuidersSAG", "sd15_medium", sag),
        Setup("built-in SelfAttentionGuidance", "sd15_medium", builtin_sag),
        Setup("GuidersSLG (tiny SD3, window 0-1)", "sd3", slg),
        Setup("GuidersCFGZeroStar (zero_init_steps 1)", "sd15_medium", zero_star),
        Setup(f"GuidersScheduledCFG ({schedule_text})", "sd15_medium", scheduled),
        Setup("GuidersAutoguidance (main + weak)", "sd15_medium", autoguided, counted=(weak,)),
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
