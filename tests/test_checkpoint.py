"""machinery/checkpoint.py: a checkpoint may name only this repository's own classes, decided from
the name and the repository's files, before anything is imported; a virtual environment inside
the clone (the README's layout) and installed packages do not count."""

import os
import sys

import pytest
import torch

from machinery import checkpoint
from conftest import ROOT


def test_own_modules_are_the_files_of_the_repository():
    names = checkpoint.own_modules()
    tops = {f[:-3] for f in os.listdir(ROOT) if f.endswith(".py")}
    packages = {f"{d}.{f[:-3]}" for d in ("machinery", "beyond") for f in os.listdir(os.path.join(ROOT, d))
                if f.endswith(".py")}
    assert names == tops | packages and {"unet", "smd", "machinery.run", "beyond.categorical"} <= names


def test_a_venv_inside_the_clone_is_not_the_repository(tmp_path):
    for path in ["smd.py", "pkg/__init__.py", "pkg/mod.py", ".venv/lib/python3.11/site-packages/torch/__init__.py",
                 "venv/lib/python3.11/site-packages/numpy/__init__.py", "torch/nn.py", "my-tool.py", "data/x.py"]:
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / path).write_text("")
    assert checkpoint.own_modules(str(tmp_path)) == {"smd", "pkg.__init__", "pkg.mod"}   # torch/ is no package


@pytest.mark.parametrize("name", ["torch.nn.Linear", "numpy.ndarray", "scipy.linalg.LinAlgError", "os.system",
                                  "outside.Model", "unet.norm", "unet.Nowhere", ".venv.lib.Model", "Model"])
def test_a_class_from_elsewhere_is_refused_before_any_import(name, tmp_path, monkeypatch):
    (tmp_path / "outside").mkdir()   # a package on sys.path, outside the repository: importing it leaves a mark
    (tmp_path / "outside" / "__init__.py").write_text(f"open({str(tmp_path / 'imported')!r}, 'w').close()\n"
                                                      "import torch\nModel = torch.nn.Linear\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ValueError, match=f"names the class '{name}', which is not a model of this repository"):
        checkpoint.build_model(name, {})
    assert not (tmp_path / "imported").exists() and "outside" not in sys.modules


def test_the_repositorys_classes_are_found():
    assert checkpoint.resolve("unet.UNet").__name__ == "UNet"
    assert checkpoint.resolve("beyond.categorical.CategoricalUNet").__name__ == "CategoricalUNet"
    with pytest.raises(ValueError, match="not a diffusion chain of this repository"):
        checkpoint.resolve("unet.UNet", checkpoint.smd.Diffusion, "diffusion chain")
    with pytest.raises(ValueError, match="has no config_class"):
        checkpoint.build_model("smd.Diffusion", {})
    assert isinstance(checkpoint.build_model("unet.UNet", dict(ch=32, ch_mult=(1, 2), num_res_blocks=1)),
                      torch.nn.Module)
