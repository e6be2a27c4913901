"""Runs every `vlmtune` command of docs/guides/gemma3.md, in order, on a tiny Gemma 3 with the real template."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

from PIL import Image

from vlmtune.cli import main

ROOT = Path(__file__).resolve().parent.parent
GUIDE = ROOT / "docs" / "guides" / "gemma3.md"


def guide_commands() -> list[list[str]]:
    blocks = re.findall(r"```bash\n(.*?)```", GUIDE.read_text(), flags=re.S)
    return [shlex.split(line)[1:] for block in blocks for line in block.splitlines() if line.startswith("vlmtune ")]


def with_tiny_model(argv: list[str], model_dir: Path) -> list[str]:
    """The hub id lives in the recipe: override it right after `-c RECIPE` (overrides precede the flags)."""
    if "-c" not in argv:
        return argv
    i = argv.index("-c") + 2
    return [*argv[:i], f"model.name_or_path={model_dir}", *argv[i:]]


def test_every_guide_command_runs(tmp_path, tiny_model, monkeypatch, capsys):
    model_dir = tiny_model("gemma3")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "recipes").symlink_to(ROOT / "recipes")
    (tmp_path / "receipts").mkdir()
    Image.new("RGB", (64, 48), "white").save(tmp_path / "receipts" / "0001.png")
    record = {"messages": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Total?"}]},
                           {"role": "assistant", "content": [{"type": "text", "text": "12,000"}]}],
              "images": ["receipts/0001.png"]}
    (tmp_path / "my_data.jsonl").write_text("\n".join(json.dumps(record) for _ in range(4)) + "\n")

    commands = guide_commands()
    assert [c[0] for c in commands] == ["inspect", "finetune", "finetune", "export", "generate", "generate"]
    for argv in commands:
        assert main(with_tiny_model(argv, model_dir)) == 0, argv
        out = capsys.readouterr().out
        if argv[0] == "inspect":  # only the answer and the end of turn are trained
            assert "\x1b[1;32m12,000<end_of_turn>\x1b[0m" in out
    assert (tmp_path / "runs/gemma3-lora/final/adapter_config.json").is_file()
    assert (tmp_path / "runs/gemma3-sft/final/model.safetensors").is_file()
    assert (tmp_path / "runs/gemma3-merged/model.safetensors").is_file()
    preds = [json.loads(x) for x in (tmp_path / "preds.jsonl").read_text().splitlines()]
    assert len(preds) == 4 and preds[0]["reference"] == "12,000"
