"""guidance_core is the framework-free half of the pack: torch and the standard library only."""

import ast
import subprocess
import sys
from pathlib import Path

CORE = Path(__file__).resolve().parents[2] / "guidance_core"
HOST_MODULES = {"comfy", "comfy_api", "comfy_extras", "comfy_execution", "nodes", "folder_paths", "server",
                "execution", "node_helpers", "latent_preview"}
ALLOWED_THIRD_PARTY = {"torch"}


def imported_top_level_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def test_core_sources_import_only_torch_and_the_standard_library():
    offenders = {}
    for path in sorted(CORE.glob("*.py")):
        outside = {name for name in imported_top_level_modules(path)
                   if name not in sys.stdlib_module_names and name not in ALLOWED_THIRD_PARTY and name != "__future__"}
        if outside:
            offenders[path.name] = sorted(outside)
    assert offenders == {}, f"guidance_core imports more than torch and the standard library: {offenders}"


def test_importing_the_core_loads_no_host_module():
    # A fresh interpreter: importing every core module must not pull in a single ComfyUI module.
    code = (
        f"import sys; sys.path.insert(0, {str(CORE.parent)!r})\n"
        "import guidance_core.rules, guidance_core.schedules, guidance_core.perturb, guidance_core.plan\n"
        f"host = {sorted(HOST_MODULES)!r}\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in host))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]", result.stdout
