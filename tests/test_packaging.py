"""carnk_pkpd installs like any other package: the wheel carries the model files (from the top-level
``models/``) and the embedded cohorts, and a non-editable install runs from any folder.

The wheel test works offline and fast: the sources are copied to a temporary folder and built there
(``pip wheel --no-deps --no-build-isolation``); the wheel is installed with ``--no-deps`` into a fresh
venv whose dependencies come from the current environment through a ``.pth`` line (the current
environment's own ``.pth`` files, such as an editable install of carnk_pkpd, are not processed there).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import tomllib
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))


def test_pyproject_lists_every_package_and_an_spdx_license():
    meta = _pyproject()
    assert meta["project"]["license"] == "MIT"
    tool = meta["tool"]["setuptools"]
    listed = set(tool["packages"])
    found = {
        ".".join(p.relative_to(ROOT / "src").parts)
        for p in (ROOT / "src" / "carnk_pkpd").rglob("*")
        if p.is_dir() and p.name != "__pycache__" and (any(p.glob("*.py")) or any(p.glob("*.csv")))
    } | {"carnk_pkpd"}
    assert found <= listed, f"packages missing from pyproject [tool.setuptools].packages: {found - listed}"
    assert tool["package-dir"]["carnk_pkpd.models"] == "models"
    assert not (ROOT / "src" / "carnk_pkpd" / "models").exists()  # one copy of the model files only


def test_model_names_resolve_from_any_folder(tmp_path, monkeypatch):
    from carnk_pkpd.spec import available_models, load_model

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("CARNK_PKPD_MODELS", raising=False)
    assert {"reference", "stein"} <= set(available_models())
    assert load_model("reference").name == "reference"


def _run(args: list, cwd: Path, env: dict, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def test_wheel_installs_into_a_fresh_venv_and_finds_its_models(tmp_path):
    src = tmp_path / "src-copy"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, src / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
    shutil.copytree(ROOT / "src", src / "src", ignore=ignore)
    shutil.copytree(ROOT / "models", src / "models", ignore=ignore)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "CARNK_PKPD_MODELS")}
    env["PIP_NO_INDEX"] = "1"
    built = _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                  str(tmp_path / "dist"), str(src)], tmp_path, env)  # fmt: skip
    if built.returncode != 0 and "No module named pip" in built.stderr:
        pytest.skip("pip is not available in this environment")
    assert built.returncode == 0, built.stderr
    wheel = next((tmp_path / "dist").glob("carnk_pkpd-*.whl"))

    target = tmp_path / "venv"
    venv.EnvBuilder(with_pip=False).create(target)
    py = target / "bin" / "python"
    site = Path(_run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                     tmp_path, env).stdout.strip())  # fmt: skip
    (site / "_deps_from_test_env.pth").write_text(sysconfig.get_paths()["purelib"] + "\n", encoding="utf-8")
    inst = _run([str(py), "-m", "pip", "install", "--no-deps", "-q", str(wheel)], tmp_path, env)
    assert inst.returncode == 0, inst.stderr

    work = tmp_path / "elsewhere"  # not the repository: the model files must come from the package
    work.mkdir()
    probe = _run([str(py), "-c", "import carnk_pkpd, carnk_pkpd.spec as s; print(carnk_pkpd.__file__); "
                  "print(s.load_model('reference').source_file)"], work, env)  # fmt: skip
    assert probe.returncode == 0, probe.stderr
    module_file, model_file = probe.stdout.split()
    assert Path(module_file).is_relative_to(site), module_file
    assert Path(model_file).is_relative_to(site / "carnk_pkpd" / "models"), model_file

    exe = target / "bin" / "carnk-pkpd"
    cohort = site / "carnk_pkpd" / "resources" / "example_cohort.csv"
    ok = _run([str(exe), "validate", str(cohort)], work, env)
    assert ok.returncode == 0, ok.stderr
    assert "SYNTHETIC" in ok.stdout
    missing = _run([str(exe), "simulate", "--model", "nonexistent", "--out", "x.csv"], work, env)
    assert missing.returncode == 1 and "reference" in missing.stderr and "Traceback" not in missing.stderr
    sim = _run(
        [str(exe), "simulate", "--model", "reference", "--n-subjects", "2", "--out", "c.csv"], work, env
    )
    assert sim.returncode == 0, sim.stderr
    assert (work / "c.csv").read_text(encoding="utf-8").startswith("# SYNTHETIC")
