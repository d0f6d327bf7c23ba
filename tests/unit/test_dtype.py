"""``resolve_dtype``: float32 instead of emulated bf16 on CPUs without bf16 instructions."""

from __future__ import annotations

from pathlib import Path

import pytest

from modal_service.engine.engine import cpu_flags, resolve_dtype

AVX2 = frozenset({"fpu", "avx2", "fma"})


@pytest.mark.parametrize(
    ("requested", "is_cpu", "flags", "expected"),
    [
        ("auto", True, AVX2, "float32"),
        ("auto", True, AVX2 | {"avx512_bf16"}, "auto"),
        ("auto", True, AVX2 | {"amx_bf16"}, "auto"),
        ("auto", True, frozenset(), "float32"),
        ("auto", False, AVX2, "auto"),
        ("bfloat16", True, AVX2, "bfloat16"),
        ("float16", False, AVX2, "float16"),
    ],
)
def test_resolve_dtype(requested: str, is_cpu: bool, flags: frozenset[str], expected: str) -> None:
    assert resolve_dtype(requested, is_cpu=is_cpu, flags=flags) == expected


def test_cpu_flags_reads_the_first_flags_line(tmp_path: Path) -> None:
    info = tmp_path / "cpuinfo"
    info.write_text(
        "processor\t: 0\nflags\t\t: fpu avx2 avx512_bf16\nbugs\t: x\n"
        "processor\t: 1\nflags\t\t: fpu\n",
        encoding="utf-8",
    )
    assert cpu_flags(str(info)) == {"fpu", "avx2", "avx512_bf16"}


def test_cpu_flags_without_cpuinfo_is_empty(tmp_path: Path) -> None:
    assert cpu_flags(str(tmp_path / "missing")) == frozenset()
