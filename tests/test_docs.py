"""The README and docs/ link to files and sections that exist (the Results moved details into docs/), and
the README's library tour (``scripts/api_example.py``) runs and prints what the README promises."""
import ast
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAGES = ["README.md", *sorted(os.path.relpath(os.path.join(d, f), ROOT) for d, _, files in os.walk(os.path.join(ROOT, "docs"))
                              for f in files if f.endswith(".md") and "/api" not in d)]
LINK = re.compile(r"\]\(([^)\s]+)\)")


def slugs(page):
    """GitHub's anchors for the headings of ``page``: lower case, punctuation dropped, spaces to hyphens."""
    with open(os.path.join(ROOT, page)) as f:
        headings = [line.lstrip("#").strip() for line in f if re.match(r"#{1,6} ", line)]
    return {re.sub(r"[^\w\- ]", "", h.lower()).replace(" ", "-") for h in headings}


def test_slugs_follow_github():
    assert "why-lasso-beat-spp-at-85-before-finetuning-and-what-closed-the-gap" in slugs("docs/log/quality.md")
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


def _tour(script: str) -> str:
    """Run ``scripts/<script>`` as the README says; its output, after checking it exited cleanly."""
    result = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", script)], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


@pytest.mark.slow
def test_api_example_tour_runs():
    """The README sends notebook users to ``python scripts/api_example.py``: search, select, compress, save."""
    stdout = _tour("api_example.py")
    members = re.findall(r"keep (\d+)%: ([\d,]+) params \(predicted ([\d,]+)\), masked vs compressed max diff (\S+)",
                         stdout)
    assert [m[0] for m in members] == ["70", "50", "30"], stdout
    for _, params, predicted, diff in members:
        assert params == predicted and float(diff) < 1e-5, stdout
    sizes = [int(m[1].replace(",", "")) for m in members]
    assert sizes[0] > sizes[1] > sizes[2]
    assert "saved and reloaded: True" in stdout
    assert re.search(r"the path covers \d+\.\d% of the prunable params", stdout), stdout
    best = re.search(r"select_best at 50%: ranked by (entry|z), values (binary|settled|path), scores (\{.*\})", stdout)
    assert best and len(ast.literal_eval(best.group(3))) == 6, stdout   # every reading scored: 2 orders x 3 values


@pytest.mark.slow
def test_llm_api_example_tour_runs():
    """The README's LLM tour (``python scripts/api_example_llm.py``): exact members, identical generation, reload."""
    pytest.importorskip("transformers", reason="the LLM tour needs transformers: pip install -e '.[llm]'")
    stdout = _tour("api_example_llm.py")
    members = re.findall(r"keep (\d+)% of (\w+): ([\d,]+) params \(predicted ([\d,]+)\), masked vs compressed logits "
                         r"max diff (\S+), 16 greedy tokens identical: (\w+)", stdout)
    assert [(m[0], m[1]) for m in members] == [("70", "params"), ("50", "params"), ("50", "flops")], stdout
    for _, _, params, predicted, diff, same in members:
        assert params == predicted and float(diff) < 1e-4 and same == "True", stdout
    assert "saved and reloaded: LlamaForCausalLM True" in stdout


@pytest.mark.slow
def test_clip_api_example_tour_runs():
    """The README's CLIP tour (``python scripts/api_example_clip.py``): exact members of both towers, per-tower
    budgets, reload."""
    pytest.importorskip("transformers", reason="the CLIP tour needs transformers: pip install -e '.[llm]'")
    stdout = _tour("api_example_clip.py")
    members = re.findall(r"keep (\d+)% \((\w+)\): ([\d,]+) params \(predicted ([\d,]+)\), masked vs compressed "
                         r"embeddings max diff (\S+)", stdout)
    assert [(m[0], m[1]) for m in members] == [("70", "global"), ("50", "global"), ("50", "part")], stdout
    for _, _, params, predicted, diff in members:
        assert params == predicted and float(diff) < 1e-5, stdout
    assert "saved and reloaded: CLIPModel True" in stdout


@pytest.mark.slow
def test_quickstart_notebook_runs():
    """examples/quickstart.ipynb, executed as a user runs it (nbclient, a fresh kernel): members at three budgets
    smaller than the dense model, compression exact, the saved model reloads. The notebook is kept without outputs."""
    nbformat = pytest.importorskip("nbformat", reason="the notebook test needs nbformat, nbclient, ipykernel: "
                                                      "pip install -e '.[test]'")
    nbclient = pytest.importorskip("nbclient", reason="pip install -e '.[test]'")
    pytest.importorskip("ipykernel", reason="pip install -e '.[test]'")
    path = os.path.join(ROOT, "examples", "quickstart.ipynb")
    notebook = nbformat.read(path, as_version=4)
    assert not any(cell.get("outputs") for cell in notebook.cells), "commit the notebook without outputs"
    nbclient.NotebookClient(notebook, timeout=240, kernel_name="python3",
                            resources={"metadata": {"path": os.path.dirname(path)}}).execute()
    printed = "".join(out.get("text", "") for cell in notebook.cells for out in cell.get("outputs", []))
    dense = int(re.search(r"dense: ([\d,]+) parameters", printed).group(1).replace(",", ""))
    members = [int(p.replace(",", "")) for p in re.findall(r"-\d+% of the prunable parameters: ([\d,]+) parameters", printed)]
    assert len(members) == 3 and dense > members[0] > members[1] > members[2], printed
    assert float(re.search(r"masked vs compressed: max difference (\S+)", printed).group(1)) < 1e-5, printed
    assert "reloaded model equal: True" in printed, printed


@pytest.mark.slow
def test_api_reference_builds_and_every_public_name_has_a_docstring(tmp_path):
    """``make docs``: pdoc renders every module of spp, and the build refuses a public name without a docstring."""
    pytest.importorskip("pdoc", reason="the API reference needs pdoc: pip install -e '.[test]'")
    result = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "build_docs.py"), "--out", str(tmp_path)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    pages = {p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*.html")}
    for page in ("index.html", "spp.html", "spp/contrastive.html", "spp/models/clip.html", "spp/commands/search.html",
                 "spp/optim.html", "spp/family.html", "spp/bench.html"):
        assert page in pages, sorted(pages)
    assert "Linearized Bregman Iteration" in (tmp_path / "spp" / "optim.html").read_text()


def test_docs_check_finds_a_public_name_without_a_docstring(monkeypatch):
    """The check behind ``make docs`` lists a public function whose docstring is gone."""
    import spp.contrastive

    sys.path.insert(0, os.path.join(ROOT, "scripts"))
    try:
        import build_docs
    finally:
        sys.path.pop(0)
    assert "spp.contrastive.image_embeds" not in build_docs.undocumented()
    monkeypatch.setattr(spp.contrastive.image_embeds, "__doc__", None)
    assert "spp.contrastive.image_embeds" in build_docs.undocumented()
