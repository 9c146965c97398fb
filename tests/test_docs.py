"""The documentation ships with the repository: every relative link of the Markdown files resolves
to a file (and heading) of the repository, and no file cites documents kept outside it."""
import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SKIP_DIRS = {".git", ".venv", "venv", "build", "dist", "__pycache__", ".pytest_cache", ".mypy_cache",
             "results", "node_modules"}
LINK = re.compile(r"\]\(([^)\s]+)\)")
OUTSIDE = re.compile(r"\.\./shared|\bPROTOCOL\.md|\bSERVER_API\.md|\bARCHITECTURE\.md")


def project_files(*suffixes):
    for dirpath, dirnames, filenames in os.walk(ROOT):
        dirnames[:] = [d for d in dirnames if d not in SKIP_DIRS and not d.endswith(".egg-info")]
        for name in filenames:
            if name.endswith(suffixes):
                yield os.path.join(dirpath, name)


def slug(heading):
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to dashes."""
    text = re.sub(r"[`*_]", "", heading.strip().lower())
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(path):
    with open(path, encoding="utf-8") as fh:
        return {slug(line.lstrip("#")) for line in fh if line.startswith("#")}


MARKDOWN = sorted(project_files(".md"))


def test_the_docs_exist():
    for name in ("protocol.md", "server-api.md", "performance.md"):
        assert os.path.join(ROOT, "docs", name) in MARKDOWN


@pytest.mark.parametrize("path", MARKDOWN, ids=lambda p: os.path.relpath(p, ROOT))
def test_relative_links_resolve(path):
    with open(path, encoding="utf-8") as fh:
        text = fh.read()
    for target in LINK.findall(text):
        if re.match(r"^[a-z]+:", target):
            continue  # http(s):, mailto:
        file_part, _, anchor = target.partition("#")
        resolved = os.path.normpath(os.path.join(os.path.dirname(path), file_part)) if file_part else path
        assert resolved.startswith(ROOT + os.sep), f"{target} leaves the repository"
        assert os.path.exists(resolved), f"{os.path.relpath(path, ROOT)}: broken link {target}"
        if anchor and resolved.endswith(".md"):
            assert anchor in anchors(resolved), f"{os.path.relpath(path, ROOT)}: no heading for {target}"


def test_no_file_cites_documents_outside_the_repository():
    offenders = []
    for path in project_files(".py", ".md", ".cfg", ".toml", ".in", ".txt", ".html"):
        if os.path.abspath(path) == os.path.abspath(__file__):
            continue
        with open(path, encoding="utf-8", errors="replace") as fh:
            for number, line in enumerate(fh, 1):
                if OUTSIDE.search(line):
                    offenders.append(f"{os.path.relpath(path, ROOT)}:{number}: {line.strip()}")
    assert offenders == []


def test_sdist_manifest_ships_docs_and_examples():
    with open(os.path.join(ROOT, "MANIFEST.in"), encoding="utf-8") as fh:
        lines = [line.split() for line in fh if line.strip() and not line.startswith("#")]
    assert ["recursive-include", "docs", "*.md"] in lines
    assert any(parts[:2] == ["recursive-include", "examples"] and "*.py" in parts for parts in lines)
