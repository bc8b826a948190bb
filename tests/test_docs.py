"""The README and docs/ as the door: line links that land on what they name, assets that a doc
shows (and docs that show only assets that exist), and the README's and the reports' lengths."""

import os
import re

from conftest import ROOT


def text(path):
    with open(os.path.join(ROOT, path)) as f:
        return f.read()


DOCS = ["README.md", "beyond/README.md"] + [f"docs/{f}" for f in sorted(os.listdir(os.path.join(ROOT, "docs")))]


def test_readme_line_links_land_on_what_they_name():
    """[`Diffusion.loss`](smd.py#L163) must point at the line that defines loss."""
    links = re.findall(r"\[`([\w.]+)`\]\((\w+\.py)#L(\d+)\)", text("README.md"))
    assert len(links) >= 5, links
    for name, path, line in links:
        source = text(path).splitlines()[int(line) - 1]
        assert re.match(rf"\s*(def|class) {name.split('.')[-1]}\b", source), (name, path, line, source)


def test_every_asset_is_shown_by_a_doc_and_every_path_a_doc_names_exists():
    docs = "\n".join(text(d) for d in DOCS)
    walk = os.walk(os.path.join(ROOT, "assets"))
    assets = [os.path.relpath(os.path.join(d, f), ROOT) for d, _, fs in walk for f in fs]
    unnamed = [a for a in assets if a.split("assets/", 1)[1] not in docs]
    named = set(re.findall(r"\]\((?:\.\./)?(assets/[^)\s]+)\)", docs))   # the links and images
    missing = [a for a in named if not os.path.exists(os.path.join(ROOT, a))]
    code = [a for a in assets if a.endswith((".py", ".sh"))]
    assert len(named) > 10 and not unnamed and not missing and not code, (unnamed, missing, code)


def test_lengths():
    assert len(text("README.md").splitlines()) <= 250
    long = {d: n for d in DOCS[2:] if (n := len(text(d).splitlines())) > 170}
    assert not long, long
