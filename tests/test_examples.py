"""The examples run, and the documentation holds together.

Every script in ``examples/`` runs in a fresh process on one CPU device with an output folder
of its own, and must end with exit code 0 and print (and write) what it promises. README.md
and every page under ``docs/`` link only to files and headings that exist, the README stays
short, and ``docs/architecture.md`` names every module of the package.
"""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = sorted((ROOT / "examples").glob("*.py"))
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
RUN_ID = r"[0-9a-f]{32}"


def _run_example(script: Path, out: Path) -> str:
    if "keras_hub" in script.read_text():
        pytest.importorskip("keras_hub")
    env = dict(os.environ)
    env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=1"
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    done = subprocess.run(
        [sys.executable, str(script), str(out)],
        cwd=out.parent,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, f"{script.name} exited {done.returncode}:\n{done.stderr[-4000:]}"
    return done.stdout


def _check_train_tracked(stdout: str, out: Path) -> None:
    assert re.search(rf"^run id: {RUN_ID}$", stdout, re.M), stdout
    assert "step: 6" in stdout
    assert (out / "mlflow.db").is_file()


def _check_compare_optimizers(stdout: str, out: Path) -> None:
    assert len(re.findall(rf"run id {RUN_ID}", stdout)) == 2, stdout
    runs = __import__("json").loads(stdout[stdout.index("\n[") :])
    assert sorted(run["run_name"] for run in runs) == ["keras-adamw", "optax-adamw"]
    assert {run["label"].split(":")[0] for run in runs} == {"keras", "optax"}
    assert all(run["steps"] == 6 and run["status"] == "FINISHED" for run in runs)


def _check_resume_from_python(stdout: str, out: Path) -> None:
    first = re.search(rf"^first run: step 4, run id ({RUN_ID})$", stdout, re.M)
    resumed = re.search(rf"^resumed run: step 8, run id ({RUN_ID})$", stdout, re.M)
    assert first and resumed and first[1] == resumed[1], stdout
    assert (out / "checkpoints" / "8").is_dir()


def _check_lora_preset(stdout: str, out: Path) -> None:
    assert (out / "gpt2" / "config.json").is_file()
    assert re.search(rf"^run id: {RUN_ID}$", stdout, re.M), stdout
    assert "step: 4" in stdout
    assert (out / "checkpoints" / "4").is_dir()


CHECKS = {
    "train_tracked.py": _check_train_tracked,
    "compare_optimizers.py": _check_compare_optimizers,
    "resume_from_python.py": _check_resume_from_python,
    "lora_preset.py": _check_lora_preset,
}


@pytest.mark.slow
@pytest.mark.parametrize("script", EXAMPLES, ids=[s.name for s in EXAMPLES])
def test_example_runs(script, tmp_path):
    out = tmp_path / "out"
    stdout = _run_example(script, out)
    check = CHECKS.get(script.name)
    if check is not None:
        check(stdout, out)


def test_every_example_says_how_to_run_it():
    assert EXAMPLES, "examples/ holds no script"
    for script in EXAMPLES:
        source = script.read_text()
        assert source.startswith('"""'), f"{script.name} has no module docstring"
        assert f"python examples/{script.name}" in source, f"{script.name}: how to run it?"


def _without_code(text: str) -> str:
    """The page with fenced code blocks and inline code removed."""
    text = re.sub(r"^```.*?^```", "", text, flags=re.M | re.S)
    return re.sub(r"`[^`\n]*`", "", text)


def _anchors(page: Path) -> set[str]:
    """GitHub's anchors for the page's headings."""
    anchors = set()
    for heading in re.findall(r"^#{1,6} +(.+?) *$", _without_code(page.read_text()), re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        anchors.add(slug)
    return anchors


def _links(page: Path) -> list[str]:
    text = re.sub(r"^```.*?^```", "", page.read_text(), flags=re.M | re.S)
    return re.findall(r"\]\(([^)\s]+)\)", text)


@pytest.mark.parametrize("page", PAGES, ids=[str(p.relative_to(ROOT)) for p in PAGES])
def test_relative_links_resolve(page):
    for link in _links(page):
        if re.match(r"^[a-z][a-z0-9+.-]*:", link):  # http:, https:, mailto:
            continue
        target, _, anchor = link.partition("#")
        path = (page.parent / target).resolve() if target else page
        assert path.exists(), f"{page.name}: link to {link!r}: no such file"
        if anchor and path.suffix == ".md":
            assert anchor in _anchors(path), f"{page.name}: link to {link!r}: no such heading"


def test_docs_pages_are_all_linked_from_the_readme():
    linked = {(ROOT / link.partition("#")[0]).resolve() for link in _links(ROOT / "README.md")}
    for page in PAGES[1:]:
        assert page.resolve() in linked, f"README.md does not link {page.relative_to(ROOT)}"


def test_readme_is_short():
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= 250, f"README.md has {len(lines)} lines; the reference goes in docs/"


def test_readme_starts_with_the_install_and_test_commands():
    text = (ROOT / "README.md").read_text()
    block = text[text.index("```bash\n") + len("```bash\n") :].split("```", 1)[0]
    assert block.splitlines()[:2] == [
        "pip install . && kithara-ops train",
        "pip install '.[test]' && python -m pytest",
    ]


def test_architecture_names_every_module():
    text = (ROOT / "docs" / "architecture.md").read_text()
    package = ROOT / "kithara_ops"
    missing = [
        str(p.relative_to(package))
        for p in sorted(package.rglob("*.py"))
        if not re.search(rf"(?<![\w/]){re.escape(str(p.relative_to(package)))}\b", text)
    ]
    assert not missing, f"docs/architecture.md does not name: {', '.join(missing)}"
