"""Peak memory per guidance set-up, each measured in its own process, on a real ComfyUI.

Run with the host's Python (no server starts, nothing is downloaded):

    ~/ComfyUI/.venv/bin/python benchmarks/bench_memory.py [--side 64] [--steps 4] [--repeats 3] [--device cpu]

Set-ups, on the medium SD1.5-architecture UNet of bench_guidance.py (tests/host/tiny_models.py), cfg 5,
euler, a ``side`` x ``side`` latent: plain CFG, ComfyUI's PerturbedAttentionGuidance, GuidersPAG (batched: one
forward of batch 3 per step), GuidersPAG with ``branch_mode = sequential`` (one forward of batch 1 per branch),
and CFG + GuidersPAG + GuidersSEG (one forward of batch 4).

A process's peak resident memory (``resource.getrusage(RUSAGE_SELF).ru_maxrss``) can only grow, so every
set-up runs in a fresh subprocess: it imports ComfyUI, builds the model and the set-up's patched model, makes
the inputs, samples once and reports its peak. A ``baseline`` subprocess does the same without sampling; its
peak is subtracted, so each number is what sampling itself adds on top of the loaded model. Each set-up runs
``--repeats`` times (in rotating order) and the median is reported. With ``--device cuda`` each subprocess
also reports ``torch.cuda.max_memory_allocated`` over its sampling (the weights included, as ComfyUI loads
them to the GPU for the run), in the weights' ``--dtype``. Nothing here is a pass/fail check.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
from pathlib import Path

from bench_support import accelerator_missing, locate_host

REPO_ROOT = Path(__file__).resolve().parents[1]
HOST_TESTS = REPO_ROOT / "tests" / "host"
SETUPS = ("plain CFG", "built-in PAG", "GuidersPAG batched", "GuidersPAG sequential",
          "CFG + GuidersPAG + GuidersSEG")
BASELINE = "baseline (model built, no sampling)"
CFG, SEED, FAMILY = 5.0, 3, "sd15_medium"
DTYPES = ("float32", "float16", "bfloat16")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--side", type=int, default=64, help="latent side (default 64: SD1.5's 512x512 images)")
    parser.add_argument("--steps", type=int, default=4, help="sampling steps (default 4)")
    parser.add_argument("--repeats", type=int, default=3, help="subprocesses per set-up (default 3; median)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per subprocess (default 1)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                        help="cpu (peak RSS), or cuda (peak RSS and torch.cuda.max_memory_allocated)")
    parser.add_argument("--dtype", choices=DTYPES, default=None,
                        help="weights' dtype (default float32 on the CPU, float16 on cuda)")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)  # internal: one set-up, in this process
    return parser.parse_args()


def patched_model(run_node, model, setup: str):
    """The set-up's model: the nodes as a user would chain them (PAG on the middle block, as the built-in)."""
    if setup in ("plain CFG", BASELINE):
        return model
    if setup == "built-in PAG":
        return run_node("PerturbedAttentionGuidance", model=model, scale=3.0)[0]
    branch_mode = "sequential" if setup == "GuidersPAG sequential" else "batched"
    pag = run_node("GuidersPAG", model=model, scale=3.0, layers="middle", branch_mode=branch_mode)[0]
    if setup == "CFG + GuidersPAG + GuidersSEG":
        return run_node("GuidersSEG", model=pag, scale=3.0, layers="middle")[0]
    return pag


def child(args: argparse.Namespace) -> None:
    """One set-up in this process: build, sample (unless baseline), print one JSON line with the peaks."""
    sys.path.insert(0, str(HOST_TESTS))
    import harness

    harness.prepare_host_imports(cpu=args.device == "cpu")
    import torch

    torch.set_num_threads(args.threads)
    harness.bootstrap(cpu=args.device == "cpu")
    harness.load_guiders_pack()
    import tiny_models

    tiny_models.INFERENCE_DTYPE = getattr(torch, args.dtype)
    model = tiny_models.make_model(FAMILY)
    patched = patched_model(harness.run_node, model, args.child)
    positive, negative = tiny_models.make_conditioning(FAMILY, seed=1)
    latent = tiny_models.make_latent(FAMILY, h=args.side, w=args.side, seed=2)
    cuda = args.device == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    if args.child != BASELINE:
        harness.sample(patched, positive, negative, latent, cfg=CFG, steps=args.steps, seed=SEED)
    report = {"rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}  # Linux: KiB
    if cuda:
        report["cuda_mib"] = torch.cuda.max_memory_allocated() / 2**20
    print("MEMORY " + json.dumps(report))


def measure(args: argparse.Namespace, setup: str) -> dict:
    command = [sys.executable, __file__, "--child", setup, "--side", str(args.side), "--steps", str(args.steps),
               "--threads", str(args.threads), "--device", args.device, "--dtype", args.dtype]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    lines = [line for line in done.stdout.splitlines() if line.startswith("MEMORY ")]
    if done.returncode != 0 or not lines:
        sys.exit(f"{setup}: the subprocess failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
    return json.loads(lines[-1].removeprefix("MEMORY "))


def main() -> None:
    args = parse_args()
    if args.dtype is None:
        args.dtype = "float32" if args.device == "cpu" else "float16"
    if args.child is not None:
        locate_host()
        return child(args)
    missing = accelerator_missing(args.device)
    if missing:
        print(f"{missing}: nothing measured. Run this on a machine with an NVIDIA/ROCm GPU.")
        return None
    host = locate_host()
    order = [BASELINE, *SETUPS]
    results: dict[str, list[dict]] = {setup: [] for setup in order}
    for repeat in range(args.repeats):
        shift = repeat % len(order)
        for setup in order[shift:] + order[:shift]:
            results[setup].append(measure(args, setup))
            print(f"  repeat {repeat + 1}: {setup}: {results[setup][-1]}", flush=True)

    def median(setup: str, key: str) -> float:
        return statistics.median(r[key] for r in results[setup])

    baseline = median(BASELINE, "rss_mib")
    print(f"\nComfyUI at {host}; {args.device}, {args.dtype} weights; medium SD1.5 UNet, latent 1x4x{args.side}x"
          f"{args.side}, {args.steps} steps euler, cfg {CFG}; {args.repeats} subprocess(es) per set-up, medians")
    print(f"Baseline (imports, model and inputs, no sampling): peak RSS {baseline:.0f} MiB")
    plain = median("plain CFG", "rss_mib") - baseline
    header = f"  {'set-up':<32} {'peak RSS':>10} {'sampling adds':>14} {'[min, max]':>16} {'/ plain CFG':>12}"
    if args.device == "cuda":
        header += f" {'CUDA peak':>10}"
    print(header)
    for setup in SETUPS:
        own = [r["rss_mib"] - baseline for r in results[setup]]
        line = (f"  {setup:<32} {median(setup, 'rss_mib'):8.0f} MiB {statistics.median(own):10.0f} MiB "
                f"[{min(own):6.0f}, {max(own):6.0f}] {statistics.median(own) / plain:12.2f}")
        if args.device == "cuda":
            line += f" {median(setup, 'cuda_mib'):6.0f} MiB"
        print(line)
    return None


if __name__ == "__main__":
    main()
