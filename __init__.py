"""ComfyUI-Guiders: classifier-free-guidance methods as chainable ComfyUI nodes. Registration only.

Importing this package has no side effects (pytest imports it when collecting the repo): the nodes and
the host modules they need are imported when ComfyUI calls ``comfy_entrypoint``.
"""

WEB_DIRECTORY = "./js"


async def comfy_entrypoint():
    from .nodes.extension import GuidersExtension

    return GuidersExtension()
