"""The ComfyUI plumbing, one module per job (families: what the pack knows about each model family)."""
