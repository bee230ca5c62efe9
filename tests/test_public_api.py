"""The public names of ``mdaf_rec`` and ``mdaf_rec.models``: light to import, each the object of its
defining module; the README's research-code snippet runs as written."""

from __future__ import annotations

import importlib
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import mdaf_rec
import mdaf_rec.models

REPO = Path(__file__).resolve().parents[1]


def test_import_mdaf_rec_loads_neither_torch_nor_torchrec() -> None:
    code = ("import sys, mdaf_rec, mdaf_rec.models\n"
            "heavy = sorted(m for m in ('torch', 'torchrec', 'fbgemm_gpu', 'matplotlib') if m in sys.modules)\n"
            "assert not heavy, heavy\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.mark.parametrize("package", [mdaf_rec, mdaf_rec.models])
def test_public_names_resolve_to_their_defining_modules(package) -> None:
    assert package.__all__ and set(package.__all__) <= set(dir(package))
    for name in package.__all__:
        value = getattr(package, name)
        module = importlib.import_module(package._EXPORTS[name])
        assert value is getattr(module, name), name
    with pytest.raises(AttributeError, match=f"module '{package.__name__}' has no attribute 'MDAF_Transformer'"):
        package.MDAF_Transformer  # noqa: B018


def test_readme_research_code_snippet_runs_as_written() -> None:
    readme = (REPO / "README.md").read_text()
    section = readme.split("### Switching from the research code", 1)[1]
    code = section.split("```python\n", 1)[1].split("```", 1)[0]
    # The snippet's `...` inputs become tensors named after their keyword; everything else runs verbatim.
    code = re.sub(r'(\w+)=\.\.\.', r'\1=inputs["\1"]', code)
    code = re.sub(r'"(\w+)": \.\.\.', r'"\1": inputs["\1"]', code)
    assert "..." not in code, code
    g = torch.Generator().manual_seed(0)
    inputs = {"target_item": torch.tensor([5, 6, 7]), "target_category": torch.tensor([1, 2, 3]),
              "item_history": torch.randint(1, 300, (3, 4), generator=g),
              "category_history": torch.randint(1, 30, (3, 4), generator=g),
              "user_id": torch.tensor([1, 2, 3]), "hour": torch.tensor([0, 5, 23]), "dayofweek": torch.tensor([0, 3, 6])}
    namespace = {"inputs": inputs}
    torch.manual_seed(0)
    exec(compile(code, "README.md", "exec"), namespace)  # noqa: S102 - the repository's own README
    probs, gate = namespace["probs"], namespace["gate"]
    assert probs.shape == (3,) and gate.shape == (3, 1)
    assert bool(((probs > 0) & (probs < 1)).all()) and bool(((gate >= 0) & (gate <= 1)).all())
    assert namespace["model"].model.static_branch is not None  # the TorchRec MDAF it holds
