"""The installed project is one package, tritongpt: folder names such as kernels, model and data never reach
site-packages, so it installs beside Hugging Face's `kernels` (a test dependency for this reason) and any other
project's `model` or `data`."""
import ast
import importlib.metadata
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
GENERIC_NAMES = ("kernels", "model", "data", "training")


def python_elsewhere(tmp_path, code: str) -> subprocess.CompletedProcess:
    """Python run outside the repository, where only what is installed can be imported."""
    return subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120)


def test_the_distribution_installs_no_generic_top_level_names(tmp_path):
    code = ("import importlib.metadata, json; d = importlib.metadata.distribution('tritongpt'); "
            "print(json.dumps([d.read_text('top_level.txt'), [str(f) for f in d.files]]))")
    result = python_elsewhere(tmp_path, code)  # the installed record, not the build metadata in the repository
    assert result.returncode == 0, result.stderr
    roots, files = json.loads(result.stdout)
    assert roots.split() == ["tritongpt"]
    top_level = {Path(f).parts[0].removesuffix(".py") for f in files}
    assert not top_level & set(GENERIC_NAMES), sorted(top_level)


def test_tritongpt_imports_from_anywhere_and_leaves_generic_names_alone(tmp_path):
    code = f"""
import importlib.util, json
import tritongpt.kernels, tritongpt.model, tritongpt.data.prepare, tritongpt.loop
found = {{name: getattr(importlib.util.find_spec(name), "origin", None) for name in {GENERIC_NAMES!r}}}
print(json.dumps({{"ours": tritongpt.kernels.__file__, "generic": found}}))
"""
    result = python_elsewhere(tmp_path, code)
    assert result.returncode == 0, result.stderr
    seen = json.loads(result.stdout)
    assert Path(seen["ours"]) == REPO / "kernels" / "__init__.py"
    for name, origin in seen["generic"].items():
        assert origin is None or REPO not in Path(origin).parents, f"{name} resolves into this project: {origin}"


def test_hugging_face_kernels_and_ours_work_side_by_side(tmp_path):
    code = """
import kernels
import tritongpt.kernels
print(kernels.__file__)
print(hasattr(kernels, "get_kernel"), sorted(tritongpt.kernels.OPS))
"""
    try:
        importlib.metadata.distribution("kernels")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("Hugging Face's kernels is not installed (pip install -e '.[test]' installs it)")
    result = python_elsewhere(tmp_path, code)
    assert result.returncode == 0, result.stderr
    theirs, flags = result.stdout.splitlines()
    assert "site-packages" in theirs and REPO not in Path(theirs).parents
    assert flags == "True ['add_layer_norm', 'attention', 'attention_qkvpacked', 'gelu_mlp', 'layer_norm', 'linear_cross_entropy']"


def python_in_repository(code: str) -> subprocess.CompletedProcess:
    """Python run from the repository root, which is on sys.path as it is for any script run there."""
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)


def test_in_the_repository_the_bare_name_kernels_is_the_installed_package():
    """transformers imports Hugging Face's `kernels`, which the root's kernels/ folder would otherwise hide."""
    try:
        importlib.metadata.distribution("kernels")
        importlib.metadata.distribution("transformers")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("Hugging Face's kernels and transformers are not installed (pip install -e '.[test]')")
    code = """
from transformers import GPT2LMHeadModel
import kernels, tritongpt.kernels
from kernels import CUDAProperties
print(kernels.__file__)
print(sorted(tritongpt.kernels.OPS))
"""
    result = python_in_repository(code)
    assert result.returncode == 0, result.stderr
    theirs, ours = result.stdout.splitlines()
    assert REPO not in Path(theirs).parents
    assert ours == "['add_layer_norm', 'attention', 'attention_qkvpacked', 'gelu_mlp', 'layer_norm', 'linear_cross_entropy']"


def test_in_the_repository_without_an_installed_namesake_kernels_is_ours():
    code = """
import sys
import tritongpt.kernels
sys.path[:] = [entry for entry in sys.path if "-packages" not in entry]  # no installed `kernels` left to find
import kernels
print(kernels.__file__)
print(kernels.OPS.keys() == tritongpt.kernels.OPS.keys())
"""
    result = python_in_repository(code)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [str(REPO / "kernels" / "__init__.py"), "True"]


def test_prepare_runs_as_a_script_from_any_directory(tmp_path):
    result = subprocess.run([sys.executable, str(REPO / "data" / "prepare.py"), "--help"], cwd=tmp_path,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "--vocab-size" in result.stdout


def test_data_model_and_kernels_import_only_the_leaf_modules_of_tritongpt():
    """The layers below the scripts' runtime: kernels/ knows nothing of the model, and data/, model/ and kernels/
    import from tritongpt only its leaves (errors, options), which import nothing of the project."""
    allowed = {"kernels": {"tritongpt.kernels"},
               "model": {"tritongpt.kernels", "tritongpt.model"},
               "data": {"tritongpt.data", "tritongpt.errors", "tritongpt.options"}}
    allowed["tritongpt/errors.py"], allowed["tritongpt/options.py"] = set(), {"tritongpt.errors"}
    for layer, may_import in allowed.items():
        for file in sorted((REPO / layer).rglob("*.py")) if (REPO / layer).is_dir() else [REPO / layer]:
            for name in imported_modules(file):
                if name == "tritongpt" or name.startswith("tritongpt."):
                    assert any(name == m or name.startswith(m + ".") for m in may_import), f"{file}: {name}"


def imported_modules(file: Path) -> set[str]:
    tree = ast.parse(file.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            # "from tritongpt import kernels" imports tritongpt.kernels
            names |= {f"{node.module}.{alias.name}" if node.module == "tritongpt" else node.module
                      for alias in node.names}
    return names
