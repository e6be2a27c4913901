"""train.kernels=liger: the switch, and the errors where it cannot run (Liger's kernels themselves need a GPU:
bench/gpu_kernels.py; the RMSNorm table is checked per family in tests/test_families.py)."""

from __future__ import annotations

import sys

import pytest
import torch
import yaml

from vlmtune.cli import main
from vlmtune.config import RecipeError, build_recipe
from vlmtune.kernels import KernelError, require_liger
from vlmtune.loss import linear_cross_entropy


def test_liger_refused_off_cuda():
    with pytest.raises(KernelError, match=r"runs Triton kernels on CUDA.*train.kernels=torch"):
        require_liger(torch.device("cpu"))


def test_finetune_refuses_liger_on_cpu_before_loading_the_model(tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({
        "output_dir": str(tmp_path / "out"), "model": {"name_or_path": str(tmp_path / "no-model-here")},
        "data": {"train": {"source": str(tmp_path / "no-data-here"), "format": "cord_v2"}},
        "train": {"max_steps": 1, "device": "cpu", "kernels": "liger"}}))
    assert main(["finetune", "-c", str(recipe)]) == 2
    err = capsys.readouterr().err
    assert "train.kernels=liger runs Triton kernels on CUDA" in err and "no-model-here" not in err


def test_liger_missing_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "liger_kernel", None)  # import fails as if not installed
    monkeypatch.setitem(sys.modules, "liger_kernel.ops", None)
    with pytest.raises(KernelError, match="pip install liger-kernel"):
        require_liger(torch.device("cuda"))


def test_unknown_kernel_rejected_by_recipe_and_loss(tmp_path):
    tree = {"output_dir": str(tmp_path), "model": {"name_or_path": "x"},
            "data": {"train": {"source": "x", "format": "cord_v2"}}, "train": {"max_steps": 1}}
    assert build_recipe({**tree, "train": {"max_steps": 1, "kernels": "liger"}}).train.kernels == "liger"
    with pytest.raises(RecipeError, match="kernels"):
        build_recipe({**tree, "train": {"max_steps": 1, "kernels": "triton"}})
    h, w, y = torch.randn(3, 4), torch.randn(5, 4), torch.tensor([0, 1, 2])
    with pytest.raises(ValueError, match="unknown loss kernel"):
        linear_cross_entropy(h, w, None, y, 2, kernel="triton")
