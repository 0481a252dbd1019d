"""The import contract of pyproject.toml ([tool.importlinter]): every import points downward, services
-> rollout | learner -> verifiers -> the core, checked by import-linter on the layout a wheel installs
(deploy/lint-imports.sh, what `make lint` runs)."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def check_contract(repo: Path) -> subprocess.CompletedProcess:
    """`deploy/lint-imports.sh` of checkout `repo`, with this environment's import-linter."""
    lint_imports = Path(sys.executable).parent / "lint-imports"
    return subprocess.run(
        ["bash", str(repo / "deploy" / "lint-imports.sh"), str(lint_imports)],
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_every_import_points_downward():
    result = check_contract(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 kept, 0 broken" in result.stdout


def test_an_upward_import_breaks_the_contract(tmp_path):
    """The check can fail: a verifier importing the services layer is reported."""
    staged = tmp_path / "repo"
    staged.mkdir()
    for name in ("orchard", "services", "learner", "rollout", "verifiers", "deploy", "pyproject.toml"):
        subprocess.run(["cp", "-r", str(ROOT / name), str(staged / name)], check=True)
    upward = staged / "verifiers" / "upward.py"
    upward.write_text("from orchard.services import driver\n")
    result = check_contract(staged)
    assert result.returncode != 0
    assert "orchard.verifiers.upward -> orchard.services.driver" in result.stdout
