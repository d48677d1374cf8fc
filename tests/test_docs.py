"""The docs run as written: every fenced ```bash and ```python block of README.md and docs/*.md.

How it works (also in README.md, "Tests and docs"):

- Pages are found when the tests are collected (README.md, then docs/*.md in name order), so a new
  page is covered without touching this file. One test per page.
- A page's blocks run in order, in one fresh subprocess, from the root of a temporary copy of the
  repository (without .git), so blocks may write files (out/, docs/images/...) without touching the
  checkout. ```python blocks share one namespace per page, as in a notebook; ```bash blocks run with
  ``bash -euo pipefail``; both with ``PYTHONPATH`` at the copy, offline (``HF_HUB_OFFLINE=1``).
- A block marked with the line ``<!-- docs-test: skip: REASON -->`` directly above its fence (blank
  lines between are allowed) is not run. Use it for what cannot run on a CPU in seconds: a GPU, the
  Hub, a long run, a user's own data. A marker without a reason is an error.
- Tiny stand-ins: before a page runs, the copy holds ``out/``, the tiny test model (tests/tiny.py)
  with its processor, as the folder that the docs call "a trained model"; and the Hub id
  ``facebook/sam-vit-base`` in a block is replaced by a tiny transformers SAM folder of the same kind.
- A page has 300 s; the failure names the page, the block's line and its output.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SKIP = re.compile(r"^<!--\s*docs-test:\s*skip\s*:\s*(.+?)\s*-->\s*$")
FENCE = re.compile(r"^```(\w*)\s*$")
HUB_STAND_INS = {"facebook/sam-vit-base": "tiny-sam"}
"""Hub ids in the docs and the folder (in the copy) that stands in for each."""
PAGE_TIMEOUT = 300
IGNORED = shutil.ignore_patterns(".git", ".venv*", "__pycache__", "*.egg-info", "outputs", ".pytest_cache")


def pages() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def blocks(page: Path) -> list[tuple[int, str, str, str | None]]:
    """``(line, language, code, skip_reason)`` of each bash/python block, in order."""
    lines = page.read_text(encoding="utf-8").splitlines()
    found, index = [], 0
    while index < len(lines):
        match = FENCE.match(lines[index])
        if not match or not match[1]:
            index += 1
            continue
        start, language = index, match[1]
        end = next((j for j in range(start + 1, len(lines)) if lines[j].strip() == "```"), None)
        if end is None:
            raise AssertionError(f"{page.name}:{start + 1}: code block never closed")
        if language in ("bash", "python"):
            found.append(
                (start + 1, language, "\n".join(lines[start + 1 : end]) + "\n", _skip_reason(lines, start, page))
            )
        index = end + 1
    return found


def _skip_reason(lines: list[str], fence: int, page: Path) -> str | None:
    above = fence - 1
    while above >= 0 and not lines[above].strip():
        above -= 1
    if above < 0 or "docs-test" not in lines[above]:
        return None
    match = SKIP.match(lines[above].strip())
    if not match:
        raise AssertionError(f"{page.name}:{above + 1}: malformed marker; write <!-- docs-test: skip: REASON -->")
    return match[1]


DRIVER = textwrap.dedent(
    """
    import subprocess, sys, traceback
    namespace = {"__name__": "__main__"}
    for line, language, code in BLOCKS:
        print(f"--- block at line {line} ({language})", flush=True)
        if language == "bash":
            result = subprocess.run(["bash", "-euo", "pipefail", "-c", code])
            if result.returncode:
                print(f"FAILED block at line {line}: exit code {result.returncode}", flush=True)
                sys.exit(1)
        else:
            try:
                exec(compile(code, f"{PAGE}:{line}", "exec"), namespace)
            except BaseException:
                traceback.print_exc()
                print(f"FAILED block at line {line}", flush=True)
                sys.exit(1)
    """
)


def make_stand_ins(work: Path) -> None:
    """``out/``: the tiny DB-SAM with its processor; ``tiny-sam/``: a tiny transformers SAM for Hub ids."""
    from tiny import save_tiny_dbsam, tiny_processor, tiny_sam_config
    from transformers import SamModel

    save_tiny_dbsam(work / "out", modality="CT", window=(40, 400))
    SamModel(tiny_sam_config()).save_pretrained(work / "tiny-sam")
    tiny_processor().save_pretrained(work / "tiny-sam")


@pytest.mark.parametrize("page", pages(), ids=lambda p: str(p.relative_to(ROOT)))
def test_page_runs_as_written(page, tmp_path):
    runnable = [(line, language, code) for line, language, code, skip in blocks(page) if skip is None]
    if not runnable:
        pytest.skip(f"{page.name}: no block to run")
    work = tmp_path / "repo"
    shutil.copytree(ROOT, work, ignore=IGNORED, symlinks=True)
    make_stand_ins(work)
    for hub_id, folder in HUB_STAND_INS.items():
        runnable = [(line, language, code.replace(hub_id, folder)) for line, language, code in runnable]
    code, output = run_blocks(runnable, work, page.name)
    assert code == 0, f"{page.relative_to(ROOT)} failed:\n{output[-6000:]}"


def run_blocks(runnable: list[tuple[int, str, str]], work: Path, name: str) -> tuple[int, str]:
    """Run the blocks in order in one subprocess from ``work``; its exit code and output."""
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(work), str(work / "tests")]),
        "HF_HUB_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
        "MPLBACKEND": "Agg",
        "PYTHONIOENCODING": "utf-8",
    }
    driver = f"PAGE = {name!r}\nBLOCKS = {runnable!r}\n" + DRIVER
    try:
        result = subprocess.run(
            [sys.executable, "-c", driver],
            cwd=work,
            env=env,
            capture_output=True,
            encoding="utf-8",
            errors="replace",  # progress bars draw with Unicode blocks, whatever the locale
            timeout=PAGE_TIMEOUT,
        )
    except subprocess.TimeoutExpired as error:
        pytest.fail(f"{name}: did not finish in {PAGE_TIMEOUT} s; mark long blocks skipped\n{error.stdout}")
    return result.returncode, result.stdout + result.stderr


def test_the_runner_finds_blocks_markers_and_unclosed_fences(tmp_path):
    page = tmp_path / "page.md"
    page.write_text(
        "text\n```bash\necho one\n```\n<!-- docs-test: skip: needs a GPU -->\n\n```python\nimport torch\n```\n"
        "```yaml\na: 1\n```\n```python\nx = 1\n```\n"
    )
    assert blocks(page) == [
        (2, "bash", "echo one\n", None),
        (7, "python", "import torch\n", "needs a GPU"),
        (13, "python", "x = 1\n", None),
    ]
    page.write_text("<!-- docs-test: skip -->\n```bash\necho\n```\n")
    with pytest.raises(AssertionError, match="malformed marker"):
        blocks(page)
    page.write_text("```python\nx = 1\n")
    with pytest.raises(AssertionError, match="never closed"):
        blocks(page)


def test_blocks_share_a_namespace_and_the_first_failure_is_named(tmp_path):
    ok = [
        (1, "python", "x = 41\n"),
        (4, "bash", "echo hello > f.txt\n"),
        (7, "python", "assert open('f.txt').read() == 'hello\\n' and x == 41\n"),
    ]
    assert run_blocks(ok, tmp_path, "page.md")[0] == 0
    failing = [(1, "python", "x = 1\n"), (3, "bash", "false\necho not reached\n"), (9, "python", "x = 2\n")]
    code, output = run_blocks(failing, tmp_path, "page.md")
    assert code != 0 and "FAILED block at line 3" in output and "not reached" not in output
    code, output = run_blocks([(5, "python", "undefined_name\n")], tmp_path, "page.md")
    assert code != 0 and "FAILED block at line 5" in output and "NameError" in output
