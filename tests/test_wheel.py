"""The wheel built from the repository installs into a fresh venv and `beamhub up` works there.

Slow (a build, a venv, a pip install and a whole stack; minutes the first time, pip's and npm's
caches make later runs quicker): select with ``-m wheel``, leave out with ``-m "not wheel"``.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import psutil
import pytest

from tests.hub.hubstack import service_dir

pytestmark = pytest.mark.wheel

REPO = Path(__file__).resolve().parents[1]
#: the repository's folders that install as beamhub.<folder> (setup.py)
PACKAGE_FOLDERS = ("auth", "hub", "kernels", "streaming", "widgets", "bench", "notebooks")
#: data files the code reads at run time, named as in the wheel (checked besides "every file")
READ_AT_RUN_TIME = [
    "beamhub/notebooks/01-first-look.ipynb",
    "beamhub/streaming/templates/default.yaml",
    "beamhub/streaming/templates/moderate.yaml",
    "beamhub/hub/enclaves/dev.yaml",
    "beamhub/hub/enclaves/moderate.yaml",
    "beamhub/hub/gateway/policies/default.yaml",
    "beamhub/hub/gateway/openapi.yaml",
    "beamhub/hub/up/beamhub.default.yaml",
    "beamhub/hub/up/idp.mjs",
    "beamhub/hub/up/node/package.json",
    "beamhub/hub/up/node/package-lock.json",
    "beamhub/hub/jupyterhub_config.py",
    "beamhub/kernels/tiers.yaml",
    "beamhub/kernels/_jobwrap.py",
    "beamhub/widgets/dashboard.html",
    "beamhub/widgets/dashboard_error.html",
]
#: a small deployment; the template is named package-relative, as `beamhub check` advises
UP_YAML = """\
enclave: dev
hub: {port: 0}
tokens: {ttl: 60}
dsn: {template: streaming/templates/default.yaml}
detector: {rate_hz: 2, shape: [64, 64], print_every_s: 0}
"""


def _source_files() -> list[str]:
    """The repository's files as git sees them now (tracked or new, not ignored, not deleted)."""
    out = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=REPO,
        capture_output=True,
        check=True,
    ).stdout.decode()
    return sorted(f for f in out.split("\0") if f and os.path.lexists(REPO / f))


def _run(argv: list[str], timeout: float = 600) -> None:
    """Run a build step; on failure, show its output (quiet otherwise: pip is chatty)."""
    done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
    assert done.returncode == 0, f"{argv} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The wheel, built from a copy of the working tree (setuptools' build/ may hold stale files)."""
    src = tmp_path_factory.mktemp("src")
    for name in _source_files():
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / name, src / name, follow_symlinks=False)
    out = tmp_path_factory.mktemp("dist")
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(out), str(src)])
    (built,) = out.glob("beamhub-*.whl")
    return built


@pytest.mark.timeout(700)
def test_the_wheel_holds_only_the_beamhub_namespace_and_every_file_of_its_folders(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names}
    dist_info = {t for t in tops if t.endswith(".dist-info")}
    assert tops - dist_info == {"beamhub"}, f"top level of {wheel.name}: {sorted(tops)}"
    assert len(dist_info) == 1
    missing = [n for n in READ_AT_RUN_TIME if n not in names]
    assert not missing, f"not in the wheel: {missing}"
    # every file of the package folders ships (data included), under the same relative name
    shipped = {
        "beamhub/" + f
        for f in _source_files()
        if f.split("/")[0] in PACKAGE_FOLDERS and "__pycache__" not in f
    }
    assert not shipped - set(names), f"not in the wheel: {sorted(shipped - set(names))}"
    # the npm pins are the repository's own (hub/up/node/ links to them), not a drifting copy
    zf = zipfile.ZipFile(wheel)
    for pin in ("package.json", "package-lock.json"):
        assert zf.read(f"beamhub/hub/up/node/{pin}") == (REPO / pin).read_bytes()


def _descendants(pid: int) -> set[psutil.Process]:
    try:
        return set(psutil.Process(pid).children(recursive=True))
    except psutil.NoSuchProcess:
        return set()


@pytest.mark.timeout(900)
def test_beamhub_up_runs_from_the_wheel_in_a_fresh_venv_outside_the_checkout(wheel, tmp_path):
    tmp_path = service_dir("wheel")  # as root the services run as beamhub-* from this venv
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    py, beamhub = venv / "bin" / "python", venv / "bin" / "beamhub"
    _run([str(py), "-m", "pip", "install", "-q", "--disable-pip-version-check", str(wheel)])
    work, home = tmp_path / "work", tmp_path / "home"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(BEAMHUB_HOME=str(home), PYTHONNOUSERSITE="1")

    # the venv imports its own copy, never the checkout's (no editable finder, no PYTHONPATH)
    probe = subprocess.run(
        [
            str(py),
            "-c",
            "import json, beamhub.hub, beamhub.notebooks\n"
            "from beamhub.hub.jupyterhub_config import NOTEBOOKS\n"
            "from beamhub.hub.enclave import resolve_path\n"
            "print(json.dumps({'hub': beamhub.hub.__file__,\n"
            "  'notebooks': sorted(p.name for p in NOTEBOOKS.glob('*.ipynb')),\n"
            "  'moderate': str(resolve_path('streaming/templates/moderate.yaml'))}))",
        ],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    found = json.loads(probe.stdout)
    venv_real = venv.resolve()
    for key in ("hub", "moderate"):
        assert Path(found[key]).resolve().is_relative_to(venv_real), found
    assert Path(found["moderate"]).is_file()
    assert found["notebooks"], "the beamtime notebooks are not in the installed package"
    assert not Path(found["hub"]).resolve().is_relative_to(REPO)

    config = work / "beamhub.yaml"
    config.write_text(UP_YAML)
    out_path = tmp_path / "up.out"
    seen: set[psutil.Process] = set()
    with open(out_path, "wb") as out:
        proc = subprocess.Popen(
            [str(beamhub), "up", str(config)],
            cwd=work,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + 300
        while "beamhub up: running" not in out_path.read_text(errors="replace"):
            seen |= _descendants(proc.pid)
            assert proc.poll() is None, f"beamhub up exited:\n{out_path.read_text()[-4000:]}"
            assert time.monotonic() < deadline, f"not running:\n{out_path.read_text()[-4000:]}"
            time.sleep(0.2)
        seen |= _descendants(proc.pid)
        output = out_path.read_text()
        assert "installing the dev identity provider's" in output
        assert (home / "node" / "node_modules" / ".bin" / "configurable-http-proxy").exists()
        runtime = json.loads((home / "runtime-urls.json").read_text())
        assert runtime["hub"].startswith("http://127.0.0.1:")
        proc.send_signal(signal.SIGTERM)
        status = proc.wait(60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
    assert status == 0, out_path.read_text()[-4000:]
    _, alive = psutil.wait_procs(list(seen), timeout=10)
    for p in alive:
        p.kill()
    assert not alive, f"`beamhub up` left processes behind: {alive}"
