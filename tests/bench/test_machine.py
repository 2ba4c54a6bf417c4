"""`bench._common.machine` names the CPU and its SIMD flags from /proc/cpuinfo."""

from jaxground.bench._common import machine


def test_names_model_and_the_simd_flags_that_set_the_gemm_rate(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nmodel name\t: Test CPU 9000\nflags\t\t: fpu avx2 fma avx512f avx512_bf16 sse2\n"
                    "processor\t: 1\nmodel name\t: Other\nflags\t\t: fpu\n")
    line = machine(str(info))
    assert line.startswith("Test CPU 9000, ")
    assert "SIMD avx2 fma avx512f avx512_bf16," in line and "sse2" not in line
    assert "usable cores" in line and "GiB RAM" in line and "; JAXGROUND_MALLOC=" in line


def test_a_missing_cpuinfo_still_gives_a_line(tmp_path):
    assert machine(str(tmp_path / "absent")).startswith("unknown CPU, ")
