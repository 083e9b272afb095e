"""The README and docs/ link to files and sections that exist (the Results moved details into docs/), and
the README's library tour (``scripts/api_example.py``) runs and prints what the README promises."""
import ast
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAGES = ["README.md", *(os.path.join("docs", f) for f in sorted(os.listdir(os.path.join(ROOT, "docs"))) if f.endswith(".md"))]
LINK = re.compile(r"\]\(([^)\s]+)\)")


def slugs(page):
    """GitHub's anchors for the headings of ``page``: lower case, punctuation dropped, spaces to hyphens."""
    with open(os.path.join(ROOT, page)) as f:
        headings = [line.lstrip("#").strip() for line in f if re.match(r"#{1,6} ", line)]
    return {re.sub(r"[^\w\- ]", "", h.lower()).replace(" ", "-") for h in headings}


def test_slugs_follow_github():
    assert "why-lasso-beat-spp-at-85-before-finetuning-and-what-closed-the-gap" in slugs("docs/quality.md")
    assert "pruning-quality-fashion-mnist-real-data" in slugs("README.md")


@pytest.mark.parametrize("page", PAGES)
def test_relative_links_resolve(page):
    with open(os.path.join(ROOT, page)) as f:
        links = LINK.findall(f.read())
    local = [link for link in links if not re.match(r"[a-z]+:", link)]
    assert local, f"{page} links to nothing in the repository"
    broken = []
    for link in local:
        path, _, anchor = link.partition("#")
        target = os.path.normpath(os.path.join(os.path.dirname(page), path)) if path else page
        if not os.path.exists(os.path.join(ROOT, target)):
            broken.append(f"{link} (no file {target})")
        elif anchor and anchor not in slugs(target):
            broken.append(f"{link} (no heading #{anchor} in {target})")
    assert not broken, f"{page}: broken links: {broken}"


def test_api_example_tour_runs():
    """The README sends notebook users to ``python scripts/api_example.py``: search, select, compress, save."""
    result = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "api_example.py")],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    members = re.findall(r"keep (\d+)%: ([\d,]+) params \(predicted ([\d,]+)\), masked vs compressed max diff (\S+)",
                         result.stdout)
    assert [m[0] for m in members] == ["70", "50", "30"], result.stdout
    for _, params, predicted, diff in members:
        assert params == predicted and float(diff) < 1e-5, result.stdout
    sizes = [int(m[1].replace(",", "")) for m in members]
    assert sizes[0] > sizes[1] > sizes[2]
    assert "saved and reloaded: True" in result.stdout
    best = re.search(r"select_best at 50%: ranked by (entry|z), values (binary|path), scores (\{.*\})", result.stdout)
    assert best and len(ast.literal_eval(best.group(3))) == 4, result.stdout   # every reading scored


def test_llm_api_example_tour_runs():
    """The README's LLM tour (``python scripts/api_example_llm.py``): exact members, identical generation, reload."""
    pytest.importorskip("transformers", reason="the LLM tour needs transformers: pip install -e '.[llm]'")
    result = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "api_example_llm.py")],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    members = re.findall(r"keep (\d+)% of (\w+): ([\d,]+) params \(predicted ([\d,]+)\), masked vs compressed logits "
                         r"max diff (\S+), 16 greedy tokens identical: (\w+)", result.stdout)
    assert [(m[0], m[1]) for m in members] == [("70", "params"), ("50", "params"), ("50", "flops")], result.stdout
    for _, _, params, predicted, diff, same in members:
        assert params == predicted and float(diff) < 1e-4 and same == "True", result.stdout
    assert "saved and reloaded: LlamaForCausalLM True" in result.stdout


def test_clip_api_example_tour_runs():
    """The README's CLIP tour (``python scripts/api_example_clip.py``): exact members of both towers, per-tower
    budgets, reload."""
    pytest.importorskip("transformers", reason="the CLIP tour needs transformers: pip install -e '.[llm]'")
    result = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "api_example_clip.py")],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    members = re.findall(r"keep (\d+)% \((\w+)\): ([\d,]+) params \(predicted ([\d,]+)\), masked vs compressed "
                         r"embeddings max diff (\S+)", result.stdout)
    assert [(m[0], m[1]) for m in members] == [("70", "global"), ("50", "global"), ("50", "part")], result.stdout
    for _, _, params, predicted, diff in members:
        assert params == predicted and float(diff) < 1e-5, result.stdout
    assert "saved and reloaded: CLIPModel True" in result.stdout
