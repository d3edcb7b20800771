"""The kernels/ folder installs as fastmoe_adv.kernels, never as a top-level ``kernels``."""
import importlib
import subprocess
import sys
import zipfile

import pytest

import fastmoe_adv


def test_kernels_is_a_subpackage():
    kernels = importlib.import_module("fastmoe_adv.kernels")
    assert kernels.__name__ == "fastmoe_adv.kernels"
    assert callable(kernels.gated_mix) and callable(kernels.pgd_step)
    assert fastmoe_adv.kernels is kernels


def test_public_api_exports():
    for name in ("ResNet18", "GroupedResNet18", "FastSoftMoE", "ReferenceSoftMoE", "MoEOutput"):
        assert name in fastmoe_adv.__all__ and hasattr(fastmoe_adv, name)


@pytest.mark.slow
def test_wheel_holds_no_top_level_kernels_package(tmp_path):
    root = importlib.import_module("fastmoe_adv").__file__.rsplit("/fastmoe_adv/", 1)[0]
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                           "-w", str(tmp_path), root], capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot build a wheel here: {proc.stderr[-300:]}")
    wheel, = tmp_path.glob("fastmoe_adv-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "fastmoe_adv/kernels/__init__.py" in names
    assert "fastmoe_adv/kernels/gated_mix.py" in names and "fastmoe_adv/kernels/pgd_step.py" in names
    tops = {n.split("/")[0] for n in names}
    assert tops <= {"fastmoe_adv", next(t for t in tops if t.endswith(".dist-info"))}, tops
