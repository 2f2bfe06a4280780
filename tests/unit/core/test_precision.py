"""pipeline.core.precision: the inference precision chosen from the hardware found."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.core.precision import choose_precision, cpu_flags

AMX_XEON = {"avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile"}
EPYC_AVX2 = {"avx2", "fma", "sse4_2"}


@pytest.mark.parametrize(
    ("flags", "gpus", "expected"),
    [
        (AMX_XEON, [], "bfloat16"),
        ({"avx512f", "avx512_bf16"}, [], "bfloat16"),
        (EPYC_AVX2, [], "float32"),  # emulated bfloat16 would be slower
        (EPYC_AVX2, [(8, 0)], "float16"),  # tensor cores
        (AMX_XEON, [(6, 1)], "float32"),  # a GPU without tensor cores runs the model
        (EPYC_AVX2, [(7, 0), (8, 6)], "float16"),
    ],
)
def test_auto_picks_the_fastest_native_precision(flags, gpus, expected) -> None:
    assert choose_precision("auto", flags, gpus) == expected


def test_an_explicit_precision_is_kept_and_a_bad_one_named() -> None:
    assert choose_precision("bfloat16", EPYC_AVX2) == "bfloat16"
    assert choose_precision("float32", AMX_XEON) == "float32"
    with pytest.raises(ValueError, match="predict.precision must be one of"):
        choose_precision("int8", AMX_XEON)


def test_cpu_flags_are_read_from_cpuinfo(tmp_path: Path) -> None:
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nflags\t\t: fpu avx2 amx_bf16\nbugs\t\t: none\n")
    assert cpu_flags(info) == {"fpu", "avx2", "amx_bf16"}
    assert cpu_flags(tmp_path / "missing") == frozenset()
