"""The node list ComfyUI registers (see the package's ``comfy_entrypoint``)."""

from comfy_api.latest import ComfyExtension, io

from . import guidance_nodes, schedule_nodes


class GuidersExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return [*schedule_nodes.NODES, *guidance_nodes.NODES]
