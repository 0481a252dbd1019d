"""One installed namespace: the wheel puts every layer inside `orchard` and no generic top-level
package (`services`, `verifiers`, ...) in site-packages; pyproject's package list is whole."""

import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
LAYERS = ("services", "learner", "rollout", "verifiers")


def declared_packages() -> list[str]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]


def test_every_package_of_the_checkout_is_declared():
    found = {"orchard"}
    for layer in LAYERS:
        for init in (ROOT / layer).rglob("__init__.py"):
            found.add("orchard." + ".".join(init.parent.relative_to(ROOT).parts))
    assert found == set(declared_packages())


@pytest.mark.slow
def test_the_wheel_installs_one_namespace(tmp_path):
    source = tmp_path / "source"  # a copy: setuptools builds in the source tree (build/, *.egg-info)
    source.mkdir()
    for name in ("pyproject.toml", "README.md", "orchard", *LAYERS):
        subprocess.run(["cp", "-r", str(ROOT / name), str(source / name)], check=True)
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--quiet",
            "--no-deps",
            "--no-build-isolation",
            str(source),
            "-w",
            str(tmp_path),
        ],
        check=True,
        capture_output=True,
        timeout=300,
    )
    (wheel,) = tmp_path.glob("orchard_rl-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top_level = {name.split("/")[0] for name in names}
    assert top_level == {"orchard", wheel.name.split("-")[0] + "-" + wheel.name.split("-")[1] + ".dist-info"}
    for layer in LAYERS:
        assert f"orchard/{layer}/__init__.py" in names
    assert "orchard/rollout/engines/csrc/forward.cpp" in names  # the engine's C++ source travels along
    entry_points = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
    assert "orchard = orchard.services.cli:main" in entry_points
    # installed alone (no checkout beside it), the layers import from inside the package
    target = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(target), str(wheel)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    assert not any((target / layer).exists() for layer in LAYERS)
    probe = "import orchard, orchard.services.run.admission as a, orchard.verifiers.math_answer as m; print(a.__file__, m.__file__)"
    shown = subprocess.run(
        [sys.executable, "-c", probe],
        cwd=tmp_path,
        env={"PYTHONPATH": str(target)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert shown.returncode == 0, shown.stderr
    assert all(path.startswith(str(target / "orchard")) for path in shown.stdout.split())
