"""The beamtime notebooks run top to bottom with nbval against a running `beamhub up` stack.

Where they run: alice logs in through the identity provider, the hub spawns her server, and nbval
(a pytest subprocess) executes each notebook in a fresh kernel whose environment is exactly her
server's, read from the server process (/proc/PID/environ): the delegated project token, the DSN
and token-service URLs, the scheduler settings and the server's own hub API token. So the kernel
talks to the same DSN, hub and scheduler as one started by JupyterLab would, and nbval can compare
the outputs of the `# NBVAL_CHECK_OUTPUT` cells. (The browser test runs notebook 03 inside the
spawned server itself, through JupyterLab.)
"""

from __future__ import annotations

import os
import pwd
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import nbformat
import pytest

from tests.hub.hubstack import service_dir
from tests.notebooks.beamtime import NOTEBOOKS

NAMES = ["01-first-look", "02-live-analysis", "03-steer-the-experiment"]


def _as_server_account(env: dict[str, str], workdir: Path) -> tuple[list[str], Path]:
    """As root, run the kernel as the server's own account (the owner of its HOME), as
    JupyterLab would, in a folder of hers: what she creates (e.g. ~/.beamhub/dask for the Dask
    workers, which run as her) must be hers. Without root: as we are, in ``workdir``."""
    owner = os.stat(env["HOME"]).st_uid if env.get("HOME") else os.geteuid()
    if os.geteuid() != 0 or owner == 0:
        return [], workdir
    account = pwd.getpwuid(owner)
    mine = service_dir("nbval")
    os.chown(mine, account.pw_uid, account.pw_gid)
    os.chmod(mine, 0o700)
    prefix = ["setpriv", f"--reuid={account.pw_uid}", f"--regid={account.pw_gid}",
              "--init-groups", "--"]  # fmt: skip
    return prefix, mine


def run_nbval(notebook: Path, env: dict[str, str], workdir: Path) -> tuple[int, str]:
    """``pytest --nbval-lax`` on a copy of ``notebook`` in ``workdir`` (the server's root)."""
    prefix, workdir = _as_server_account(env, workdir)
    copy = workdir / notebook.name
    shutil.copy(notebook, copy)
    # not the repository's pytest settings (testpaths, markers, asyncio)
    (workdir / "pytest.ini").write_text("[pytest]\nasyncio_default_fixture_loop_scope = function\n")
    if prefix:
        for path in (workdir, copy, workdir / "pytest.ini"):
            os.chown(path, os.stat(workdir).st_uid, os.stat(workdir).st_gid)
    cmd = [
        *prefix,
        sys.executable,
        "-m",
        "pytest",
        "-p",
        "no:cacheprovider",
        "--nbval-lax",
        "--nbval-current-env",
        "--nbval-cell-timeout=150",
        "--timeout=240",
        "-q",
        "-c",
        str(workdir / "pytest.ini"),
        "--rootdir",
        str(workdir),
        str(copy),
    ]
    proc = subprocess.run(cmd, cwd=workdir, env=env, capture_output=True, text=True, timeout=270)
    return proc.returncode, proc.stdout + proc.stderr


@pytest.mark.timeout(300)
@pytest.mark.parametrize("name", NAMES)
def test_notebook_runs_top_to_bottom(
    name: str, alice_server_env: dict[str, str], tmp_path: Path
) -> None:
    notebook = NOTEBOOKS / f"{name}.ipynb"
    code_cells = sum(c.cell_type == "code" for c in nbformat.read(notebook, as_version=4).cells)
    checked = sum(
        c.cell_type == "code" and c.source.startswith("# NBVAL_CHECK_OUTPUT")
        for c in nbformat.read(notebook, as_version=4).cells
    )
    assert checked >= 1, f"{name} checks no output"
    t0 = time.monotonic()
    status, output = run_nbval(notebook, alice_server_env, tmp_path)
    took = time.monotonic() - t0
    first_failure = output.find(".ipynb::Cell")  # the first failing cell, not only the last
    shown = output[max(0, first_failure - 200) :][:8000] if first_failure >= 0 else output[-6000:]
    assert status == 0, f"{name} failed under nbval after {took:.0f} s:\n{shown}"
    passed = re.search(r"(\d+) passed", output)
    assert passed and int(passed.group(1)) == code_cells, output[-2000:]
    assert not re.search(r"\d+ failed", output), output[-2000:]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("beamtime_stack", ["dev"], indirect=True)  # the harness: one is enough
def test_nbval_fails_when_a_checked_output_differs(
    alice_server_env: dict[str, str], tmp_path: Path
) -> None:
    """The harness can fail: notebook 01 with one expected line changed must not pass."""
    book = nbformat.read(NOTEBOOKS / "01-first-look.ipynb", as_version=4)
    cell = next(c for c in book.cells if "token is for this project:" in c.source)
    stream = next(o for o in cell.outputs if o.get("output_type") == "stream")
    assert "token is for this project: True" in stream["text"]
    stream["text"] = stream["text"].replace(
        "token is for this project: True", "token is for this project: False"
    )
    doctored = tmp_path / "src" / "01-first-look.ipynb"
    doctored.parent.mkdir()
    nbformat.write(book, doctored)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    status, output = run_nbval(doctored, alice_server_env, run_dir)
    assert status == 1, output[-3000:]
    assert "1 failed" in output and "Cell outputs differ" in output, output[-3000:]
    assert "+  project: False" in output, output[-3000:]
