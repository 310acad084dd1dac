"""ComfyUI side of the pack: ``comfy_adapter`` owns the host plumbing; the other modules declare nodes."""
