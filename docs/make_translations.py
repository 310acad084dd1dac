"""Writes locales/<lang>/nodeDefs.json and main.json (the files ComfyUI serves a custom node's translations
from) from the node definitions and one translation table per language, docs/translations/<lang>.json.

ComfyUI (app/custom_node_manager.py ``build_translations``, 0.8.0 and 0.33.0) reads every
``locales/<lang>/main.json`` of a custom node and puts ``nodeDefs.json`` under its ``nodeDefs`` key; the
frontend looks up ``nodeDefs.<node id>.display_name``, ``.description``, ``.inputs.<input>.tooltip``,
``.outputs.<index>.tooltip`` and ``nodeCategories.<category segment>``, falling back to the English of the
definition. So the English always comes from the node's schema; the table gives only its translation:

    {"_categories": {"guiders": "..."},
     "_shared": {"<input>": {"en": "<the English tooltip>", "text": "<its translation>"}},
     "<node id>": {"display_name": "...", "description": "...", "inputs": {"<input>": "..."},
                   "outputs": {"<index>": "..."}}}

A ``_shared`` entry translates an input of any node whose tooltip is exactly its ``en`` (so a changed
tooltip is reported instead of silently keeping an old translation). ``{pag_families}``, ``{seg_families}``,
``{slg_families}``, ``{tpg_families}``, ``{tsg_families}``, ``{pag_auto}``, ``{slg_auto}`` and ``{tpg_auto}``
in a translation are filled from the family records (nodes/host/families.py), as the English is. A missing
entry is an error naming the node and the input; so is a translation whose English changed since it was
written (``_sources``: a fingerprint of the English per translated string, recorded by ``--accept``).

Run with the Python of a ComfyUI (the node definitions import comfy_api):
    COMFYUI_PATH=~/ComfyUI ~/ComfyUI/.venv/bin/python docs/make_translations.py
    ... docs/make_translations.py --accept zh     # after updating zh's translations of changed English
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TABLES = REPO / "docs" / "translations"
LOCALES = REPO / "locales"
LANGUAGES = ("zh", "ja")
COMMAND = "COMFYUI_PATH=<your ComfyUI> <its python> docs/make_translations.py"


class MissingTranslations(Exception):
    pass


def english(node_classes: dict[str, type]) -> dict[str, dict]:
    """Each node's English strings, from its schema: display name, description, input and output tooltips."""
    strings = {}
    for node_id, cls in node_classes.items():
        schema = cls.define_schema()
        strings[node_id] = {
            "display_name": schema.display_name or node_id,
            "description": schema.description or "",
            "category": schema.category or "",
            "inputs": {declared.id: declared.tooltip or "" for declared in schema.inputs},
            "outputs": {str(index): output.tooltip or "" for index, output in enumerate(schema.outputs)},
        }
    return strings


def placeholders(node_classes: dict[str, type]) -> dict[str, str]:
    """The parts of the English that come from the family records, for translations to embed."""
    any_node = next(iter(node_classes.values()))
    package = any_node.__module__.rsplit(".", 1)[0]
    common = sys.modules[f"{package}.common"]
    families = common.families
    return {
        "pag_families": common.family_names(common.PAG_FAMILIES),
        "seg_families": common.family_names(common.ATTENTION_FAMILIES),
        "slg_families": common.family_names(common.BLOCK_FAMILIES),
        "nag_families": common.family_names(families.families_supporting(families.NAG)),
        "pag_auto": families.recommended_summary(families.PAG),
        "slg_auto": families.recommended_summary(families.SLG),
        "tpg_families": common.family_names(common.TPG_FAMILIES),
        "tpg_auto": families.recommended_summary(families.TPG),
        "tsg_families": common.family_names(common.TSG_FAMILIES),
    }


def fingerprint(english_text: str, fill: dict[str, str]) -> str:
    """A short hash of an English string, with the parts from the family records put back as their
    placeholders (a family added changes PAG's description but not what its translation has to say)."""
    for name, value in sorted(fill.items(), key=lambda item: -len(item[1])):
        if value:
            english_text = english_text.replace(value, "{" + name + "}")
    return hashlib.sha1(english_text.encode("utf-8")).hexdigest()[:12]


def translated_fields(table: dict, strings: dict[str, dict], missing: list[str]):
    """(node id, field, English, translation or None, from _shared) for every string the nodes declare."""
    shared = table.get("_shared", {})
    for node_id, en in strings.items():
        entry = table.get(node_id)
        if entry is None:
            missing.append(f"{node_id}: no entry (display_name, description, inputs)")
            continue
        for key in ("display_name", "description"):
            if en[key]:
                yield node_id, key, en[key], entry.get(key) or None, False
        for name, tooltip in en["inputs"].items():
            if not tooltip:
                continue
            text = entry.get("inputs", {}).get(name)
            if text is None and name in shared and shared[name]["en"] == tooltip:
                yield node_id, f"inputs.{name}", tooltip, shared[name]["text"], True
                continue
            if text is None and name in shared:
                missing.append(f"{node_id}: input '{name}' (its tooltip differs from _shared's 'en')")
                continue
            yield node_id, f"inputs.{name}", tooltip, text, False
        for index, tooltip in en["outputs"].items():
            if tooltip:
                yield node_id, f"outputs.{index}", tooltip, entry.get("outputs", {}).get(index), False


def build(table: dict, strings: dict[str, dict], fill: dict[str, str], language: str) -> tuple[dict, dict]:
    """(nodeDefs, main) for one language. Raises MissingTranslations listing every missing entry, and every
    translation whose English changed since it was written (``_sources`` keeps a fingerprint of the English
    each translation was made from; ``--accept <lang>`` records them after the translations are updated)."""
    missing: list[str] = []
    changed: list[str] = []
    sources = table.get("_sources", {})
    node_defs: dict[str, dict] = {node_id: {} for node_id in strings if node_id in table}
    for node_id, field, english_text, text, from_shared in translated_fields(table, strings, missing):
        label = field.replace("inputs.", "input '").replace("outputs.", "output '")
        label += "'" if label != field else ""
        if text is None:
            missing.append(f"{node_id}: {label}")
            continue
        if not from_shared and sources.get(node_id, {}).get(field) != fingerprint(english_text, fill):
            changed.append(f"{node_id}: {label}")
        value = text.format(**fill)
        if "." in field:
            group, name = field.split(".", 1)
            node_defs[node_id].setdefault(group, {})[name] = {"tooltip": value}
        else:
            node_defs[node_id][field] = value
    categories = {segment for en in strings.values() for segment in en["category"].split("/") if segment}
    wanted = sorted(categories - {"sampling"})  # ComfyUI translates its own categories
    missing += [f"category '{segment}'" for segment in wanted if segment not in table.get("_categories", {})]
    problems = []
    if missing:
        problems.append(f"docs/translations/{language}.json lacks {len(missing)} entries:\n  " + "\n  ".join(missing)
                        + f"\nAdd them, then run: {COMMAND}")
    if changed:
        problems.append(f"docs/translations/{language}.json: the English of {len(changed)} strings changed since "
                        "they were translated:\n  " + "\n  ".join(changed)
                        + f"\nUpdate those translations, then run: {COMMAND} --accept {language}")
    if problems:
        raise MissingTranslations("\n".join(problems))
    stale = sorted(set(table) - set(strings) - {"_shared", "_categories", "_sources"})
    if stale:
        print(f"note: docs/translations/{language}.json has entries for nodes that do not exist: {stale}")
    main = {"nodeCategories": {segment: table["_categories"][segment] for segment in wanted}}
    return node_defs, main


def accept(language: str, strings: dict[str, dict], fill: dict[str, str]) -> None:
    """Record the fingerprints of the current English in the table: its translations are up to date."""
    table = load_table(language)
    sources: dict[str, dict] = {}
    for node_id, field, english_text, text, from_shared in translated_fields(table, strings, []):
        if text is not None and not from_shared:
            sources.setdefault(node_id, {})[field] = fingerprint(english_text, fill)
    table["_sources"] = sources
    (TABLES / f"{language}.json").write_text(dumps(table), encoding="utf-8")


def dumps(data: dict) -> str:
    return json.dumps(data, ensure_ascii=False, indent=2, sort_keys=False) + "\n"


def load_table(language: str) -> dict:
    return json.loads((TABLES / f"{language}.json").read_text(encoding="utf-8"))


def outputs_for(node_classes: dict[str, type]) -> dict[Path, str]:
    """Every file this script writes and its content (the test compares them with the committed files)."""
    strings, fill = english(node_classes), placeholders(node_classes)
    files, errors = {}, []
    for language in LANGUAGES:
        try:
            node_defs, main = build(load_table(language), strings, fill, language)
        except MissingTranslations as error:
            errors.append(str(error))
            continue
        files[LOCALES / language / "nodeDefs.json"] = dumps(node_defs)
        files[LOCALES / language / "main.json"] = dumps(main)
    if errors:
        raise MissingTranslations("\n".join(errors))
    return files


def load_pack() -> dict[str, type]:
    sys.path.insert(0, str(REPO / "tests" / "host"))
    import harness  # the tests' loader: ComfyUI imported on the CPU, this pack loaded as custom_nodes/ are

    harness.bootstrap()
    return harness.load_guiders_pack()


def main(argv: list[str]) -> int:
    pack = load_pack()
    if argv[:1] == ["--accept"]:
        for language in argv[1:] or LANGUAGES:
            accept(language, english(pack), placeholders(pack))
            print(f"recorded the English of docs/translations/{language}.json's translations")
    try:
        files = outputs_for(pack)
    except MissingTranslations as error:
        print(error, file=sys.stderr)
        return 1
    for path, text in files.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
        print(f"wrote {path.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
