"""The README is a newcomer's five minutes: at most 15 KB, the CUDA install and the first LoRA on its
first screen after the why, a link to every page of docs/, and links that all resolve; its two set-up
commands are the ones CI runs. (Its commands run in tests/test_docs_run.py; the config reference it
once held is docs/config.md, generated and checked by tests/test_docs_reference.py.)"""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
PAGES = [README, *sorted((REPO / "docs").glob("*.md"))]
SCREEN = 50  # lines of a terminal or of a browser window at a normal size


def test_the_readme_is_at_most_15_kb():
    assert len(README.read_bytes()) <= 15_000


def test_a_gpu_user_finds_the_cuda_install_and_the_first_lora_on_the_first_screen_after_the_why():
    lines = README.read_text(encoding="utf-8").splitlines()
    why = next(i for i, line in enumerate(lines) if line.startswith("Why:"))
    screen = "\n".join(lines[why:why + SCREEN])
    assert "download.pytorch.org/whl/cu" in screen  # the CUDA torch install command itself
    assert "(#train-your-first-lora)" in screen and "(#on-a-gpu-cuda)" in screen
    headings = [line for line in lines if line.startswith("## ")]
    assert headings[:2] == ["## Install", "## Train your first LoRA"]
    assert "### On a GPU (CUDA)" in lines and lines.index("### On a GPU (CUDA)") < lines.index(
        "### On a CPU (and what CI runs)")


def test_the_readme_links_every_docs_page():
    text = README.read_text(encoding="utf-8")
    unlinked = [p.name for p in PAGES[1:] if f"](docs/{p.name})" not in text]
    assert not unlinked, f"README.md does not link: {unlinked}"


def anchors(path: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to '-'."""
    names = set()
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith("#"):
            title = line.lstrip("#").strip().lower()
            names.add(re.sub(r"[^\w\- ]", "", title).replace(" ", "-"))
    return names


def test_every_relative_link_and_anchor_resolves():
    broken = []
    # DEMO-RESULTS.md is a demo run's report.md as written: its links point into that run's output folder.
    for page in [p for p in PAGES if p.name != "DEMO-RESULTS.md"]:
        for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text(encoding="utf-8")):
            if re.match(r"[a-z]+://", target):
                continue
            file, _, anchor = target.partition("#")
            path = (page.parent / file).resolve() if file else page
            if not path.exists():
                broken.append(f"{page.name}: {target}")
            elif anchor and path.suffix == ".md" and anchor not in anchors(path):
                broken.append(f"{page.name}: {target} (no such heading)")
    assert not broken, broken


def test_ci_runs_the_readmes_set_up_and_test_command():
    ci = (REPO / ".ci" / "run").read_text(encoding="utf-8")
    setup = re.search(r"^SETUP='(.+)'$", ci, flags=re.M).group(1)
    text = README.read_text(encoding="utf-8")
    assert f"{setup} && python3 -m pytest" in text  # the test command, as CI runs it
    assert f"{setup} && lora-offset demo --out demo-out" in text  # the main job, the same set-up
    assert 'python3 -m venv "$scratch/venv"' in ci and "python3 -m pip freeze" in ci
