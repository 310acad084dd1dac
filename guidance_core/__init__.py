"""Framework-free classifier-free-guidance library: torch and the standard library only.

The pieces:
- ``rules``: one pure tensor function per guidance formula (CFG, rescale, CFG-Zero*, APG, norms).
- ``schedules``: scales that vary over the steps of a run, and start/end windows.
- ``perturb``: pure functions on attention tensors (identity attention, smoothed queries, SAG's blur).
- ``plan``: a stack of guidance terms; says which branches a step needs and combines their predictions.
- ``cfg_rules``: TCFG's damped uncond, MAMBO-G, Mahiro, APG-Mix; ``frequency``: FreSca and FDG (a
  shape-preserving Laplacian pyramid); ``corrections``: CFGNorm, Lumina's RenormCFG, dynamic thresholding.

It never imports a host application; the ComfyUI adapter lives in ``nodes/``.
"""
