"""The node list ComfyUI registers (see the package's ``comfy_entrypoint``), and the pack's web route."""

from comfy_api.latest import ComfyExtension, io

from . import (
    attention_nodes,
    autoguidance_nodes,
    branch_rule_nodes,
    cfg_nodes,
    cfg_rule_nodes,
    condition_free_nodes,
    modality_nodes,
    nag_nodes,
    pladis_nodes,
    sag_nodes,
    schedule_nodes,
    slg_nodes,
    swg_nodes,
    web_routes,
)


class GuidersExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        # Here rather than in on_load: ComfyUI 0.8.0's loader calls only get_node_list (once per load).
        web_routes.register()
        return [*schedule_nodes.NODES, *cfg_nodes.NODES, *attention_nodes.NODES, *slg_nodes.NODES, *sag_nodes.NODES,
                *autoguidance_nodes.NODES, *cfg_rule_nodes.NODES, *nag_nodes.NODES,
                *branch_rule_nodes.NODES, *condition_free_nodes.NODES, *pladis_nodes.NODES,
                *modality_nodes.NODES, *swg_nodes.NODES]
