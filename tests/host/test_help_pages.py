"""Help pages: every registered node has js/docs/<node id>.md, which ComfyUI's node library shows instead of
the bare description (frontend 1.35 and 1.49, NodeHelpService.fetchCustomNodeHelp: it asks for
``/extensions/<pack>/docs/<node id>/<locale>.md`` first, then ``/extensions/<pack>/docs/<node id>.md``, and
resolves a relative image against ``/extensions/<pack>/docs/``, i.e. js/docs/ here).

Each page has the same shape (the CFG-rule pages set it): the node's display name as its title, a
**Paper:** or **Source:** line, the sections below, every input the node declares named in bold under
"## Inputs", a "## Try this" table with one row per family, and the schedule family picture on schedule nodes.
A node added without a page fails naming the file to add. Breaks shown to fail: GuidersSEG.md deleted (names
js/docs/GuidersSEG.md); "**blur_sigma**" renamed in it (names the input); the picture removed from a schedule
page; js/docs/schedules.png differing from docs/images/schedules.png.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DOCS = REPO / "js" / "docs"
SECTIONS = ("## When to use it", "## Inputs", "## Try this", "## Cost per step")
SCHEDULE_PICTURE = "schedules.png"  # a copy of docs/images/schedules.png, served from the web directory


def page_of(node_id: str) -> str:
    path = DOCS / f"{node_id}.md"
    if not path.is_file():
        pytest.fail(f"{node_id} has no help page: add js/docs/{node_id}.md with a '# <display name>' title, a "
                    f"**Paper:** or **Source:** line and the sections {', '.join(SECTIONS)} (see "
                    "js/docs/GuidersPAG.md)", pytrace=False)
    return path.read_text(encoding="utf-8")


def section(page: str, heading: str) -> str:
    start = page.index(heading) + len(heading)
    following = page.find("\n## ", start)
    return page[start:] if following < 0 else page[start:following]


def test_every_node_has_a_help_page_with_the_sections(guiders_pack):
    problems = []
    for node_id, cls in guiders_pack.items():
        page, schema = page_of(node_id), cls.define_schema()
        if page.splitlines()[0] != f"# {schema.display_name}":
            problems.append(f"js/docs/{node_id}.md: the first line must be '# {schema.display_name}'")
        if not re.search(r"^\*\*(Paper|Source):\*\*", page, re.M):
            problems.append(f"js/docs/{node_id}.md: no **Paper:** or **Source:** line")
        missing = [heading for heading in SECTIONS if f"\n{heading}\n" not in page]
        if missing:
            problems.append(f"js/docs/{node_id}.md: missing sections {missing}")
            continue
        inputs = section(page, "## Inputs")
        for declared in schema.inputs:
            if f"**{declared.id}**" not in inputs:
                problems.append(f"js/docs/{node_id}.md: input '{declared.id}' is not named (as **{declared.id}**) "
                                "under ## Inputs")
        rows = [line for line in section(page, "## Try this").splitlines() if line.startswith("| ")]
        if len(rows) < 2:  # a header and at least one family
            problems.append(f"js/docs/{node_id}.md: ## Try this has no table with a row per family")
        if schema.category.endswith("/schedules") and f"]({SCHEDULE_PICTURE})" not in page:
            problems.append(f"js/docs/{node_id}.md: a schedule node's page shows the schedule family picture "
                            f"![...]({SCHEDULE_PICTURE})")
    assert not problems, "\n".join(problems)


def test_images_resolve_in_the_web_directory():
    for page in sorted(DOCS.glob("*.md")):
        for target in re.findall(r"!\[[^\]]*\]\(([^)\s]+)", page.read_text(encoding="utf-8")):
            if re.match(r"^(?:/|https?://)", target):
                continue
            assert (DOCS / target).is_file(), f"{page.name}: image {target} is not in js/docs/"
    assert (DOCS / SCHEDULE_PICTURE).read_bytes() == (REPO / "docs" / "images" / SCHEDULE_PICTURE).read_bytes(), \
        "js/docs/schedules.png differs from docs/images/schedules.png: copy it after docs/make_schedule_picture.py"


def test_no_page_for_a_node_that_does_not_exist(guiders_pack):
    stale = sorted(path.stem for path in DOCS.glob("*.md") if path.stem not in guiders_pack)
    assert not stale, f"help pages for nodes the pack does not register: {stale}"
