"""Translations (zh, ja): every node, input and output tooltip the pack declares has an entry in
docs/translations/<lang>.json, the committed locales/<lang>/*.json are exactly what docs/make_translations.py
builds from those tables and the node definitions, and the host's own loader serves them.

A node added without translations fails ``test_every_node_and_input_has_a_translation`` naming the node and
the input, and the command to run. Breaks shown to fail: the zh entry of GuidersSEG's blur_sigma deleted
(names "GuidersSEG: input 'blur_sigma'"); PAG's scale tooltip changed in the node (names "GuidersPAG: input
'scale'" as changed since translated, and the --accept command); _shared's model 'en' edited (names every
node's 'model' input); a translation table entry with "{pag_famlies}" (KeyError in the build, the test errors).
"""

from __future__ import annotations

import importlib.util
import json
import re
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def _script():
    spec = importlib.util.spec_from_file_location("make_translations", REPO / "docs" / "make_translations.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("make_translations", module)
    spec.loader.exec_module(module)
    return module


make_translations = _script()


@pytest.mark.parametrize("language", make_translations.LANGUAGES)
def test_every_node_and_input_has_a_translation(guiders_pack, language):
    strings, fill = make_translations.english(guiders_pack), make_translations.placeholders(guiders_pack)
    missing = None
    try:
        node_defs, main = make_translations.build(make_translations.load_table(language), strings, fill, language)
    except make_translations.MissingTranslations as error:
        missing = str(error)
    if missing:
        pytest.fail(missing, pytrace=False)
    assert set(node_defs) == set(guiders_pack)
    for node_id, entry in node_defs.items():
        # A real translation, not the English copied (a display name such as "APG (Guiders)" may stay).
        assert entry["description"] != strings[node_id]["description"], f"{language} {node_id}: English description"
        text = json.dumps(entry, ensure_ascii=False)
        assert not re.search(r"\{[a-z_]+\}", text), f"{node_id}: an unfilled placeholder in {language}"
        # A translation keeps the technical names the English uses (method names, node ids).
        for term in set(re.findall(r"\b(?:CFG|PAG|SEG|SAG|SLG|STG|APG|NAG|TCFG|FDG|uncond|cond)\b",
                                   strings[node_id]["description"])):
            assert term in entry["description"], f"{language} {node_id}: the description lost '{term}'"


def test_committed_locales_are_what_the_script_builds(guiders_pack):
    for path, text in make_translations.outputs_for(guiders_pack).items():
        relative = path.relative_to(REPO)
        assert path.is_file(), f"{relative} is missing: run {make_translations.COMMAND}"
        assert path.read_text(encoding="utf-8") == text, \
            f"{relative} is out of date with the node definitions: run {make_translations.COMMAND}"


def test_the_host_serves_the_translations(tmp_path, monkeypatch, guiders_pack):
    """ComfyUI's own loader (app/custom_node_manager.py build_translations) finds the files where we put them,
    with the node definitions under ``nodeDefs`` as the frontend looks them up."""
    import folder_paths
    import harness

    # ComfyUI's top-level ``utils`` package (utils/json_util.py), not comfy/utils.py: in 0.8.0 a built-in
    # extra node puts ComfyUI/comfy ahead of the root on sys.path, where main.py never would.
    monkeypatch.syspath_prepend(str(harness.host_path()))
    if "utils" in sys.modules and not hasattr(sys.modules["utils"], "__path__"):
        monkeypatch.delitem(sys.modules, "utils")
    from app.custom_node_manager import CustomNodeManager

    custom_nodes = tmp_path / "custom_nodes"
    custom_nodes.mkdir()
    (custom_nodes / "ComfyUI-Guiders").symlink_to(REPO, target_is_directory=True)
    monkeypatch.setitem(folder_paths.folder_names_and_paths, "custom_nodes", ([str(custom_nodes)], set()))
    translations = CustomNodeManager().build_translations()
    for language in make_translations.LANGUAGES:
        node_defs = translations[language]["nodeDefs"]
        assert set(guiders_pack) <= set(node_defs), language
        pag = node_defs["GuidersPAG"]
        assert pag["display_name"] and pag["inputs"]["scale"]["tooltip"] and pag["inputs"]["model"]["tooltip"]
        assert translations[language]["nodeCategories"]["guiders"]
