"""The docs' relative links resolve, the tests they cite exist, and no doc names a path of one machine.

Checks README.md and every docs/**/*.md: each relative markdown link ``[text](target)`` points
at a file or folder of the repository (and, for ``file.md#anchor``, at a heading of that file),
each backticked ``docs/...`` path in the current docs exists, and no absolute path of a machine
(/root/, /work/, /tmp/, /home/) appears outside a ``$PLACEHOLDER``.
"""
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = sorted([ROOT / "README.md", *(ROOT / "docs").rglob("*.md")])
CURRENT = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]  # the archive names files as they were
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
MACHINE_PATH = re.compile(r"(?<![\w$.~-])/(root|work|tmp|home)/")
FENCE = re.compile(r"^(```|~~~)")


def strip_code_blocks(text):
    """The text without fenced code blocks (a '#' line there is no heading)."""
    out, fenced = [], False
    for line in text.splitlines():
        if FENCE.match(line.strip()):
            fenced = not fenced
            continue
        if not fenced:
            out.append(line)
    return "\n".join(out)


def slug(heading):
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces as hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def anchors(path):
    seen, out = {}, set()
    for line in strip_code_blocks(path.read_text()).splitlines():
        m = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if m:
            base = slug(m.group(1))
            n = seen.get(base, 0)
            seen[base] = n + 1
            out.add(base if n == 0 else f"{base}-{n}")
    return out


def broken_links(path):
    bad = []
    for target in LINK.findall(strip_code_blocks(path.read_text())):
        if re.match(r"^[a-z][a-z+.-]*:", target):  # http:, https:, mailto:
            continue
        file_part, _, anchor = target.partition("#")
        dest = (path.parent / file_part).resolve() if file_part else path
        if not dest.exists():
            bad.append(f"{target}: no such file")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            bad.append(f"{target}: no heading #{anchor}")
    return bad


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(doc):
    assert broken_links(doc) == []


@pytest.mark.parametrize("doc", CURRENT, ids=lambda p: str(p.relative_to(ROOT)))
def test_backticked_doc_paths_exist(doc):
    missing = []
    for ref in re.findall(r"`(docs/[^`\s]+)`", doc.read_text()):
        if any(c in ref for c in "*{}") or "NAME" in ref or "..." in ref:
            continue  # a pattern, not one file
        if not (ROOT / ref).exists():
            missing.append(ref)
    assert missing == []


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_machine_paths(doc):
    hits = [f"{i}: {line.strip()}" for i, line in enumerate(doc.read_text().splitlines(), 1)
            if MACHINE_PATH.search(line)]
    assert hits == []


def test_checker_catches_what_it_should(tmp_path):
    doc = tmp_path / "a.md"
    (tmp_path / "b.md").write_text("# Some Title, here (x)\n```\n# not a heading\n```\n")
    doc.write_text("[ok](b.md#some-title-here-x) [gone](c.md) [anchor](b.md#not-a-heading) "
                   "[web](https://example.com/x)\n")
    assert broken_links(doc) == ["c.md: no such file", "b.md#not-a-heading: no heading #not-a-heading"]
    assert MACHINE_PATH.search("MODEL=/root/models/x.gguf")
    assert MACHINE_PATH.search("see /work/shared/data")
    assert not MACHINE_PATH.search("MODEL=$MODELS/x.gguf and docs/tmp/x and ~/tmp/x")


TEST_REF = re.compile(r"(test_\w+)\.py::(test_\w+)")


@pytest.mark.parametrize("doc", CURRENT, ids=lambda p: str(p.relative_to(ROOT)))
def test_named_tests_exist_where_the_docs_say(doc):
    # the docs cite tests as evidence (tests/FILE.py::test_name): a moved or renamed test must take
    # its citations along
    wrong = []
    for module, name in TEST_REF.findall(doc.read_text(encoding="utf-8")):
        path = ROOT / "tests" / f"{module}.py"
        if not path.exists() or not re.search(rf"^def {name}\(", path.read_text(encoding="utf-8"), re.M):
            wrong.append(f"{module}.py::{name}")
    assert not wrong, f"{doc.name} cites tests that are not there: {wrong}"
