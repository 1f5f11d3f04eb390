"""ewtune installs beside other software: its wheel holds one top-level import name, ``ewtune``, so packages
called ``accountant``, ``agent``, ``bench``, ``coordinator``, ``federation`` or ``report`` (all taken on the package index)
can be installed in the same environment and both sides import what they expect."""

import os
import subprocess
import sys
import sysconfig
import textwrap
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
CLASHING = ("accountant", "agent", "bench", "coordinator", "federation", "report")
# Without PYTHONPATH, so that the clean environment sees only what is installed in it (a source tree on
# PYTHONPATH would also make pip take ewtune for installed already).
CLEAN = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(out),
                    str(REPO)], check=True, capture_output=True, env=CLEAN)
    return next(out.glob("ewtune-*.whl"))


def _stand_in_project(root: Path, name: str) -> Path:
    """A minimal installable project whose one package is ``name``, as the index's package of that name would be."""
    project = root / name
    (project / name).mkdir(parents=True)
    (project / name / "__init__.py").write_text(f"WHO = 'the other {name}'\n")
    (project / "pyproject.toml").write_text(textwrap.dedent(f"""\
        [build-system]
        requires = ["setuptools"]
        build-backend = "setuptools.build_meta"
        [project]
        name = "{name}"
        version = "9.9"
        [tool.setuptools]
        packages = ["{name}"]
        """))
    return project


def test_the_wheel_has_one_top_level_name(wheel):
    names = {Path(entry).parts[0] for entry in zipfile.ZipFile(wheel).namelist()}
    assert {name for name in names if not name.endswith(".dist-info")} == {"ewtune"}
    entries = zipfile.ZipFile(wheel).namelist()
    assert "ewtune/coordinator/federation.toml.example" in entries
    assert "ewtune/federation/flower_app/pyproject.toml" in entries


def test_the_wheel_imports_beside_packages_of_the_clashing_names(wheel, tmp_path):
    environment = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(environment)], check=True, env=CLEAN)
    python = environment / "bin" / "python"
    projects = [str(_stand_in_project(tmp_path / "projects", name)) for name in CLASHING]
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                    str(tmp_path / "wheels"), *projects], check=True, capture_output=True, env=CLEAN)
    wheels = [str(wheel), *map(str, (tmp_path / "wheels").glob("*.whl"))]
    assert len(wheels) == 1 + len(CLASHING)
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps", *wheels],
                   check=True, capture_output=True, env=CLEAN)
    # ewtune's own dependencies (numpy, torch, flwr...) come from this environment, after the clean one's packages.
    site = environment / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}" / "site-packages"
    (site / "zz_dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    check = textwrap.dedent(f"""\
        import importlib
        for name in {CLASHING!r}:
            assert importlib.import_module(name).WHO == "the other " + name, name
        import ewtune, ewtune.accountant.certified, ewtune.agent.policy, ewtune.coordinator.planner
        import ewtune.federation.messages, ewtune.bench, ewtune.report.audit_report
        assert ewtune.__file__.startswith({str(site)!r}), ewtune.__file__
        print(round(ewtune.certified_epsilon(sampling_rate=0.01, noise_multiplier=1.0, steps=100, delta=1e-5), 3))
        """)
    result = subprocess.run([str(python), "-c", check], capture_output=True, text=True, cwd=tmp_path, env=CLEAN)
    assert result.returncode == 0, result.stderr
    assert 0 < float(result.stdout) < 1
    cli = subprocess.run([str(environment / "bin" / "ewtune"), "accountant", "epsilon", "--sampling-rate", "0.01",
                          "--noise-multiplier", "1", "--steps", "100", "--delta", "1e-5", "--json"],
                         capture_output=True, text=True, cwd=tmp_path, env=CLEAN)
    assert cli.returncode == 0, cli.stderr
    assert '"epsilon_certified"' in cli.stdout
