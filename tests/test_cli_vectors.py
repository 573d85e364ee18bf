"""`actserve vectors train`: writes a file that loads back (safetensors, and GGUF through the `gguf`
package) with the directions `train_vector` computes; bad input exits 2 and writes nothing."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from actserve.interventions.steering.train import train_vector
from actserve.server.cli import main
from actserve.server.engine.config import EngineConfig
from actserve.server.engine.llm_engine import LLMEngine

POS = ["Lily got a new doll. She was so happy.", "Tom laughed with his friends.", "The sun was warm."]
NEG = ["Lily lost her doll. She was so sad.", "Tom cried alone at home.", "The rain was cold."]


def reference(model_dir: Path, layers: list[int], method: str) -> dict[int, torch.Tensor]:
    engine = LLMEngine(EngineConfig(model=str(model_dir)))
    vec = train_vector(engine.runner, engine.tokenizer, POS, NEG, layers=layers, method=method)  # type: ignore[arg-type]
    return vec.directions


def test_train_writes_safetensors(tinystories_dir: Path, tmp_path: Path) -> None:
    (tmp_path / "pos.txt").write_text("\n".join(POS) + "\n\n")
    (tmp_path / "neg.txt").write_text("\n".join(NEG) + "\n")
    out = tmp_path / "happy.safetensors"
    args = ["vectors", "train", "--model", str(tinystories_dir), "--positive", str(tmp_path / "pos.txt")]
    args += ["--negative", str(tmp_path / "neg.txt"), "--layers", "1", "--name", "happy", "--out", str(out)]
    assert main(args) == 0
    with safe_open(str(out), "pt") as f:
        assert set(f.keys()) == {"direction.1"}
        meta = f.metadata()
        got = f.get_tensor("direction.1")
    assert meta["name"] == "happy" and meta["model_hint"] == "llama" and meta["hidden_size"] == "128"
    assert meta["layer_count"] == "1" and meta["num_layers"] == "2"
    assert torch.equal(got, reference(tinystories_dir, [1], "mean_diff")[1])


def test_train_pairs_writes_gguf(tinystories_dir: Path, tmp_path: Path) -> None:
    import gguf

    pairs = tmp_path / "pairs.jsonl"
    rows = [json.dumps({"positive": p, "negative": n}) for p, n in zip(POS, NEG, strict=True)]
    pairs.write_text("\n".join(rows) + "\n")
    out = tmp_path / "happy.gguf"
    args = [
        "vectors",
        "train",
        "--model",
        str(tinystories_dir),
        "--pairs",
        str(pairs),
        "--method",
        "pca_diff",
    ]
    assert main([*args, "--name", "happy", "--out", str(out)]) == 0
    reader = gguf.GGUFReader(out)
    got = {int(t.name.split(".")[1]): torch.from_numpy(t.data.copy()) for t in reader.tensors}
    want = reference(tinystories_dir, [0, 1], "pca_diff")
    assert sorted(got) == [0, 1]
    for layer in (0, 1):
        assert torch.equal(got[layer], want[layer])


@pytest.mark.parametrize(
    "extra",
    [
        ["--layers", "5"],
        ["--layers", "one"],
        ["--method", "pca_diff", "--unpaired"],
        ["--name", "bad name"],
    ],
)
def test_bad_input_exits_2(tinystories_dir: Path, tmp_path: Path, extra: list[str]) -> None:
    (tmp_path / "p.txt").write_text("\n".join(POS))
    (tmp_path / "n.txt").write_text("\n".join(NEG))
    out = tmp_path / "v.safetensors"
    args = ["vectors", "train", "--model", str(tinystories_dir), "--positive", str(tmp_path / "p.txt")]
    args += ["--negative", str(tmp_path / "n.txt"), "--name", "v", "--out", str(out)]
    assert main([*args, *extra]) == 2
    assert not out.exists()


def test_help_through_the_module_alias() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "actserve.server", "vectors", "train", "--help"],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0 and "--pairs" in out.stdout and "--method" in out.stdout
