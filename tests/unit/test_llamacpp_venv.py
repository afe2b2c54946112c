"""llama-cpp-python, the benchmarks' and tests' peer, is built for the CPU it runs on."""

from __future__ import annotations

import pytest

from bench import llamacpp_venv

pytestmark = pytest.mark.unit

ZEN3 = {"avx2", "fma", "f16c", "sse4_2"}
ZEN4 = ZEN3 | {"avx512f", "avx512bw", "avx512vl", "avx512_vnni"}


def test_avx512_only_where_the_cpu_has_it():
    assert "-DGGML_AVX512=OFF" in llamacpp_venv.cmake_args(ZEN3)
    assert "-DGGML_AVX512_VNNI=OFF" in llamacpp_venv.cmake_args(ZEN3)
    assert "-DGGML_AVX512=ON -DGGML_AVX512_VNNI=ON" in llamacpp_venv.cmake_args(ZEN4)
    for flags in (ZEN3, ZEN4):  # never the host-detected or AMX builds
        args = llamacpp_venv.cmake_args(flags)
        assert "-DGGML_NATIVE=OFF" in args and "-DGGML_AMX_INT8=OFF" in args


def test_a_venv_built_for_another_cpu_is_not_used(tmp_path, monkeypatch):
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "python").symlink_to("/bin/true")  # "imports" anything
    monkeypatch.setattr(llamacpp_venv, "VENV", venv)
    assert llamacpp_venv.usable() is None  # no stamp: built before stamps, flags unknown
    (venv / llamacpp_venv.STAMP).write_text(llamacpp_venv.cmake_args(ZEN4 | ZEN3 | {"x"}) + " ")
    assert llamacpp_venv.usable() is None
    (venv / llamacpp_venv.STAMP).write_text(llamacpp_venv.cmake_args())
    assert llamacpp_venv.usable() == venv / "bin" / "python"
