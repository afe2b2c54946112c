"""`claw runtime selftest`: the smoke test every built image runs, checked here on the host."""

from __future__ import annotations

import json

import pytest

from runtime.api import Model
from runtime.selftest import check_model, check_opencl, write_tiny_llama
from tests.conftest import claw_subprocess

pytestmark = pytest.mark.unit


def test_tiny_model_is_a_real_gguf_llama_that_decodes_to_text(tmp_path):
    path = write_tiny_llama(tmp_path / "tiny.gguf")
    model = Model(path, backend="numpy")
    info = model.info()
    assert info["arch"] == "llama" and info["layers"] == 2 and info["tokenizer"]["bos_id"] == 1
    assert model.detokenize(model.tokenize("the claw", add_bos=False)) == "the claw"
    check = check_model(max_tokens=6)
    assert check.ok, check.error
    assert check.detail["completion_tokens"] == 6 and check.detail["text"].strip()
    assert check.detail["text"].isprintable()


def test_opencl_check_runs_a_kernel_and_reports_the_device():
    check = check_opencl(n=1000)
    assert check.ok, check.error
    assert check.detail["device"] and check.detail["max_abs_error"] <= 1e-5


def test_cli_reports_json_and_exit_0(claw):
    result = claw("runtime", "selftest", "--json")
    assert result.code == 0, result.err
    report = json.loads(result.out)
    assert report["ok"] and [c["name"] for c in report["checks"]] == ["model", "opencl"]


def test_no_opencl_platform_fails_with_a_clear_message(tmp_path):
    result = claw_subprocess("runtime", "selftest", env={"OCL_ICD_VENDORS": str(tmp_path / "none")})
    assert result.code == 1
    assert "error: self-test failed: opencl:" in result.err
    assert "install an ICD such as pocl-opencl-icd" in result.err
    assert "ok   model" in result.out and "Traceback" not in result.err
    skipped = claw_subprocess("runtime", "selftest", "--skip-opencl",
                              env={"OCL_ICD_VENDORS": str(tmp_path / "none")})
    assert skipped.code == 0, skipped.err


def test_an_image_built_without_opencl_skips_the_check_and_says_why(tmp_path):
    # Exactly what a `--opencl none` image is: no ICD at all, and CLAW_OPENCL=none in its env.
    env = {"OCL_ICD_VENDORS": str(tmp_path / "none"), "CLAW_OPENCL": "none"}
    result = claw_subprocess("runtime", "selftest", env=env)
    assert result.code == 0, result.err
    assert "skip opencl" in result.out and "built with --opencl none" in result.out
    report = json.loads(claw_subprocess("runtime", "selftest", "--json", env=env).out)
    opencl = report["checks"][1]
    assert report["ok"] and opencl["name"] == "opencl" and "numpy backend" in opencl["skipped"]
    other = claw_subprocess("runtime", "selftest", env={**env, "CLAW_OPENCL": "pocl"})
    assert other.code == 1 and "error: self-test failed: opencl:" in other.err
