"""ComfyUI side of the pack: ``host/`` holds the host plumbing (one module per job); the other modules declare nodes."""
