"""The cache benchmark's reading of callgrind's files: what it reports per request must be what the files say."""
from __future__ import annotations

import pytest

from bench import instructions
from bench.report import cache_section


@pytest.mark.parametrize("text, expected", [("1024K", 1 << 20), ("512K", 512 << 10), ("2M", 2 << 20), ("65536", 65536)])
def test_sizes_read_as_sysfs_writes_them(text, expected):
    assert instructions._size_bytes(text) == expected


def test_the_simulated_last_level_is_a_size_valgrind_takes():
    g = instructions.l2_geometry()
    assert g["size"] & (g["size"] - 1) == 0 and g["size"] >= 64 << 10  # a power of two, as valgrind needs
    assert g["ways"] >= 1 and g["line"] in (32, 64, 128)


def test_event_totals_fill_the_zeros_callgrind_leaves_out(tmp_path):
    f = tmp_path / "callgrind.out.1-01"
    f.write_text("version: 1\nevents: Ir Dr Dw I1mr D1mr D1mw ILmr DLmr DLmw Bc Bcm Bi Bim\n"
                 "fn=(1) main\n0 5 1\nsummary: 1000 300 200 40 30 20 4 3\ntotals: 1000 300 200 40 30 20 4 3\n")
    got = instructions._event_totals(f, 1)
    assert (got["Ir"], got["D1mr"], got["ILmr"], got["DLmr"]) == (1000, 30, 4, 3)
    assert got["DLmw"] == got["Bc"] == got["Bim"] == 0 and len(got) == 13  # the events the line leaves out
    assert instructions._event_totals(f, 10)["Ir"] == 100  # per request


def test_a_case_splits_the_added_misses_into_the_hooks_and_around_them():
    bare = {"Ir": 1000, "I1mr": 10, "D1mr": 20, "D1mw": 0, "ILmr": 4, "DLmr": 10, "DLmw": 1, "Bcm": 5, "Bim": 5}
    addon = {"Ir": 1100, "I1mr": 12, "D1mr": 30, "D1mw": 1, "ILmr": 6, "DLmr": 20, "DLmw": 2, "Bcm": 6, "Bim": 6}
    hooks = {"Ir": 80, "I1mr": 1, "D1mr": 4, "ILmr": 1, "DLmr": 3, "DLmw": 0, "Bcm": 1, "Bim": 0}
    row = instructions.cache_case(16, 160, bare, addon, hooks)
    assert row["l2_misses"] == {"bare": 15, "addon": 28, "ratio": 1.867, "added": 13, "in_hooks": 4,
                                "around_hooks": 9}
    assert row["instructions"]["around_hooks"] == 20 and row["branch_misses"]["added"] == 2
    floor = {"Ir": 1010, "I1mr": 10, "D1mr": 21, "ILmr": 4, "DLmr": 12, "DLmw": 1, "Bcm": 5, "Bim": 5}
    row["floor"] = instructions.counts(floor)
    assert row["floor"]["l2_misses"] == 17 and row["floor"]["l1_misses"] == 31
    text = cache_section({"l2": {"size": 1 << 20, "ways": 8, "line": 64}, "cases": [row]})
    assert "1024 KB, 8-way" in text
    l2_line = next(line for line in text.splitlines() if "l2 misses" in line).split()
    assert l2_line[-8:] == ["15", "17", "1.133", "28", "1.867", "13", "4", "9"]


def test_without_valgrind_it_says_so(monkeypatch):
    monkeypatch.setattr(instructions.shutil, "which", lambda _tool: None)
    assert "skipped" in instructions.run_cache(tiny=True)
    assert cache_section({"skipped": "not installed: valgrind"}).strip().startswith("CACHE: skipped")
