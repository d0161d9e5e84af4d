"""bench.trees: which targets it accepts and how it names them (the co-scheduled rounds are bench.cosched's)."""
from __future__ import annotations

from pathlib import Path

import pytest

from bench import trees

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("spec, kind", [
    ("bare", "bare"),
    ("floor", "floor"),
    (str(ROOT), "tree"),
])
def test_target_kind(spec: str, kind: str) -> None:
    assert trees.target_kind(spec) == kind


@pytest.mark.parametrize("spec", ["Bare", "", str(ROOT / "addon"), "/nonexistent/tree"])
def test_target_kind_refuses_what_is_no_target(spec: str) -> None:
    with pytest.raises(ValueError, match="neither bare, floor nor"):
        trees.target_kind(spec)


@pytest.mark.parametrize("specs, labels", [
    (["bare", "/tmp/a/main", "/tmp/b/main/"], ["1:bare", "2:main", "3:main"]),
    (["floor", "bare"], ["1:floor", "2:bare"]),
])
def test_labels_keep_repeats_apart(specs: list[str], labels: list[str]) -> None:
    assert trees.labels_for(specs) == labels


@pytest.mark.parametrize("argv", [["bare"], ["bare", "bare", "bare", "bare"], ["bare", "nowhere"]])
def test_cli_refuses_bad_target_lists_before_starting_anything(argv: list[str], capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as e:
        trees.main(argv)
    assert e.value.code == 2
    assert "python -m bench.trees" in capsys.readouterr().err


def test_tree_sidecar_runs_the_copied_tree(tmp_path: Path) -> None:
    copy = trees._copy_tree(ROOT, tmp_path / "tree")
    assert (copy / "addon" / "openhands.py").is_file() and (copy / "pricing").is_dir()
    assert not list(copy.rglob("__pycache__"))
    sc = trees.TreeSidecar(tmp_path / "wd", "http://127.0.0.1:9", copy, name="sidecar")
    cmd = sc.command()
    assert str(copy / "addon" / "openhands.py") in cmd
    assert not any(part.endswith("bench-addon") for part in cmd)
