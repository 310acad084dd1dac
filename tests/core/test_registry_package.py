"""The Comfy Registry package: metadata that parses, an icon the repository ships, and every file the
installed pack needs inside what ``comfy node publish`` uploads.

How the registry packs a node (comfy-cli ``comfy_cli/file_utils.py`` ``zip_files``): the files ``git ls-files``
lists, minus those a ``.comfyignore`` pattern (gitwildmatch, as .gitignore) matches, plus every file under each
``[tool.comfy] includes`` path (an include also wins over .comfyignore). An untracked file, one .gitignore
hides, or one .comfyignore matches is therefore NOT published; the test rebuilds that set with git itself
(``git ls-files --ignored --exclude-from=.comfyignore`` applies the same pattern rules).

Breaks shown to fail here: ``locales/`` added to .comfyignore (the needed-files test names
locales/zh/nodeDefs.json); ``js/`` in .gitignore with the files untracked; ``Icon`` pointing at
docs/images/missing.png; ``version = "0.1"``.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")  # Python 3.11+; ComfyUI's environments have it

REPO = Path(__file__).resolve().parents[2]
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))
REPOSITORY_URL = "https://github.com/comfyui-guiders/ComfyUI-Guiders"
# What the installed pack reads at run time: the entry point, its code, the web directory (curves, help
# pages), the example workflows (template browser), the translations, and the requirements file the install
# line runs.
NEEDED_FILES = ("__init__.py", "requirements.txt", "pyproject.toml")
NEEDED_FOLDERS = ("nodes", "guidance_core", "js", "workflows", "locales")


def test_project_metadata_is_registry_ready():
    project, comfy = PYPROJECT["project"], PYPROJECT["tool"]["comfy"]
    # docs.comfy.org/registry/specifications: a name of letters, digits, '-', '_', '.', under 100 characters,
    # starting with a letter, no two special characters in a row; a three-part semver version.
    name = project["name"]
    assert re.fullmatch(r"[A-Za-z](?:[A-Za-z0-9]|[-_.](?=[A-Za-z0-9]))*", name) and len(name) < 100, name
    assert re.fullmatch(r"\d+\.\d+\.\d+", project["version"]), f"version {project['version']!r} is not X.Y.Z"
    assert project["description"].strip()
    assert project["license"].get("text") or (REPO / project["license"]["file"]).is_file()
    assert project["urls"]["Repository"] == REPOSITORY_URL
    assert comfy["PublisherId"] and comfy["DisplayName"]
    assert isinstance(comfy.get("includes", []), list)


def test_icon_is_a_file_the_repository_ships():
    """The registry shows ``Icon`` from its URL: it must be this repository's raw file on main."""
    icon = PYPROJECT["tool"]["comfy"]["Icon"]
    prefix = REPOSITORY_URL.replace("https://github.com/", "https://raw.githubusercontent.com/") + "/main/"
    assert icon.startswith(prefix), f"Icon {icon!r} is not a raw file of {REPOSITORY_URL} on main"
    path = REPO / icon.removeprefix(prefix)
    assert path.is_file(), f"Icon {icon!r}: {path.relative_to(REPO)} does not exist (run docs/make_icon.py)"
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", f"{path.relative_to(REPO)} is not a PNG"


def test_publish_workflow_runs_the_registry_action_on_pyproject_changes():
    workflow = (REPO / ".github" / "workflows" / "publish.yml").read_text(encoding="utf-8")
    assert "Comfy-Org/publish-node-action" in workflow
    assert re.search(r"branches:\s*\n\s*-\s*main", workflow)
    assert re.search(r"paths:\s*\n\s*-\s*\"?pyproject\.toml\"?", workflow)
    assert "secrets.REGISTRY_ACCESS_TOKEN" in workflow


def test_changelog_has_this_version():
    changelog = (REPO / "CHANGELOG.md").read_text(encoding="utf-8")
    assert "## [Unreleased]" in changelog
    assert f"## [{PYPROJECT['project']['version']}]" in changelog, "CHANGELOG.md has no section for this version"


def _git(*args: str) -> list[str]:
    output = subprocess.run(["git", "-C", str(REPO), *args], check=True, capture_output=True, text=True).stdout
    return [line for line in output.splitlines() if line.strip()]


def published_files() -> set[str]:
    """The repository paths ``comfy node publish`` would upload, by comfy-cli's rule (module docstring)."""
    tracked = set(_git("ls-files"))
    ignore_file = REPO / ".comfyignore"
    ignored = set(_git("ls-files", "--cached", "--ignored", f"--exclude-from={ignore_file}")) \
        if ignore_file.is_file() else set()
    published = tracked - ignored
    for include in PYPROJECT["tool"]["comfy"].get("includes", []):
        root = REPO / include.lstrip("/")
        files = [root] if root.is_file() else [p for p in root.rglob("*") if p.is_file()]
        published |= {p.relative_to(REPO).as_posix() for p in files}
    return published


def needed_files() -> list[str]:
    """Every file of the working tree the installed pack needs (caches excluded)."""
    needed = list(NEEDED_FILES)
    for folder in NEEDED_FOLDERS:
        assert (REPO / folder).is_dir(), f"{folder}/ is missing from the repository"
        needed += [p.relative_to(REPO).as_posix() for p in sorted((REPO / folder).rglob("*"))
                   if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc"]
    return needed


@pytest.mark.skipif(shutil.which("git") is None or not (REPO / ".git").exists(),
                    reason="not a git checkout: comfy-cli would zip every file")
def test_every_needed_file_is_published():
    published = published_files()
    missing = [path for path in needed_files() if path not in published]
    assert not missing, ("not in the registry package (untracked, ignored by .gitignore, or matched by "
                         f".comfyignore; `git add` them or fix the pattern): {missing}")
