"""What vlmtune does with bad input and faults (docs/bad-input.md): nothing runs code it was not asked to, one run
per folder, images as people see them, and every mistake one line (exit code 2), never a traceback."""

from __future__ import annotations

import copy
import errno
import io
import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
import yaml
from safetensors.torch import load_file

import vlmtune.checkpoint as ckpt_mod
import vlmtune.output as output_mod
from conftest import small_recipe
from vlmtune.cli import main
from vlmtune.config import DataSource, RecipeError, build_recipe, load_recipe
from vlmtune.data.formats import to_conversation
from vlmtune.data.media import load_image
from vlmtune.data.sources import load_rows
from vlmtune.errors import DataError, OutputError, SampleError
from vlmtune.output import RunLock
from vlmtune.train import finetune


@pytest.fixture(scope="module", autouse=True)
def _processors(cached_processors):
    """The tiny model's processor is parsed once for the module's in-process runs (tests/conftest.py)."""


def write_data(folder: Path, n: int = 8, answer: str = "red") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    PIL.Image.new("RGB", (56, 56), (220, 30, 30)).save(folder / "red.png")
    rows = [{"prompt": "Which colour?", "completion": f"{answer} {i}", "images": ["red.png"]} for i in range(n)]
    (folder / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder / "train.jsonl"


def tree(model_dir, data: Path, out: Path, checkpoint: dict | None = None, **train) -> dict:
    t = small_recipe(model_dir, data.parent, out, **{"max_steps": 2, "global_batch_size": 2, "max_length": 128,
                                                      **train})
    t["data"] = {"train": {"source": str(data), "format": "messages"}}
    t["checkpoint"] = checkpoint or {}
    t["freeze"] = {"language_model": True}  # the vision tower and projector train: a fast step
    return t


def write_recipe(path: Path, t: dict) -> Path:
    path.write_text(yaml.safe_dump(t))
    return path


def one_line(capsys, command: str = "finetune") -> str:
    err = capsys.readouterr().err
    assert f"vlmtune {command}: error:" in err and "Traceback" not in err, err
    return err


@pytest.fixture(scope="module")
def checkpointed(tiny_model_dir, tmp_path_factory):
    """A 2-step run with a checkpoint after each step (the tests copy it before changing anything)."""
    root = tmp_path_factory.mktemp("checkpointed")
    data = write_data(root / "data")
    t = tree(tiny_model_dir, data, root / "run", checkpoint={"every_steps": 1, "keep": 3})
    finetune(build_recipe(t))
    return root, t


def copy_run(checkpointed, tmp_path) -> tuple[Path, dict]:
    root, t = checkpointed
    out = tmp_path / "run"
    shutil.copytree(root / "run", out)
    return out, {**copy.deepcopy(t), "output_dir": str(out)}


# ---------------------------------------------------------------------------------------------------------
# Silently wrong before: code execution, two runs in one folder, images, repeated roles, truncation, data changes


class _Payload:
    """Unpickling this runs a shell command that creates a file: what a crafted checkpoint could do."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_crafted_sharded_checkpoint_runs_no_code(checkpointed, tmp_path, capsys):
    """A trainer_state.json that says "sharded": true, with a dcp/.metadata whose unpickling runs a command: the
    resume refuses it with one line, and the command never runs."""
    out, t = copy_run(checkpointed, tmp_path)
    step = out / "checkpoints" / "step-000001"
    state = json.loads((step / "trainer_state.json").read_text())
    state.update(sharded=True, world_size=1, files={})
    state["data"]["positions"] = [[state["data"]["epoch"], state["data"]["offset"]]]
    (step / "trainer_state.json").write_text(json.dumps(state))
    marker = tmp_path / "pwned"
    (step / "dcp").mkdir()
    (step / "dcp" / ".metadata").write_bytes(pickle.dumps(_Payload(marker)))
    (step / "scheduler.pt").write_bytes(b"")
    recipe = write_recipe(tmp_path / "r.yaml", {**t, "resume": str(step)})
    assert main(["finetune", "-c", str(recipe)]) == 2
    assert "holds objects other than DCP's metadata" in one_line(capsys)
    assert not marker.exists()


def test_dcp_hyperparameter_items_load_without_running_code():
    """DCP's own planner reads non-tensor items with full pickle; vlmtune's reads them weights_only."""
    from torch.distributed.checkpoint.metadata import MetadataIndex
    from torch.distributed.checkpoint.planner import LoadItemType, ReadItem

    planner = ckpt_mod._SafePlanner()
    planner.state_dict, planner.flatten_state_dict = {"lr": None}, False
    item = ReadItem(LoadItemType.BYTE_IO, MetadataIndex("lr"), torch.Size([0]), MetadataIndex("lr"),
                    torch.Size([0]), torch.Size([0]))
    good = io.BytesIO()
    torch.save({"lr": 0.5, "betas": (0.9, 0.99)}, good)
    good.seek(0)
    planner.load_bytes(item, good)
    assert planner.state_dict["lr"] == {"lr": 0.5, "betas": (0.9, 0.99)}
    bad = io.BytesIO()
    torch.save(_Payload(Path("/nonexistent/x")), bad)
    bad.seek(0)
    with pytest.raises(pickle.UnpicklingError):
        planner.load_bytes(item, bad)


def test_export_runs_remote_code_only_when_the_command_line_asks(checkpointed, tmp_path, capsys):
    """The checkpoint's recipe.yaml says trust_remote_code: true for a model folder with code of its own: export
    without --trust-remote-code refuses with one line, and that code never runs."""
    out, _ = copy_run(checkpointed, tmp_path)
    model = tmp_path / "custom-model"
    marker = tmp_path / "code-ran"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"model_type": "my_custom_vlm",
                                                   "auto_map": {"AutoConfig": "configuration_x.XConfig"}}))
    (model / "configuration_x.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    step = out / "checkpoints" / "step-000002"
    recipe = yaml.safe_load((step / "recipe.yaml").read_text())
    recipe["model"].update(name_or_path=str(model), trust_remote_code=True)
    (step / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    assert main(["export", "--checkpoint", str(step), "--out", str(tmp_path / "exported")]) == 2
    err = one_line(capsys, "export")
    assert "own Python code" in err and not marker.exists()


def test_a_second_run_into_a_held_folder_stops_with_one_line(tiny_model_dir, tmp_path, capsys):
    """A live run holds output_dir (here: a lock naming a live process of this host); a second run stops."""
    data = write_data(tmp_path / "data")
    out = tmp_path / "run"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        import socket

        (out / ".vlmtune.lock").write_text(json.dumps({"host": socket.gethostname(), "pid": holder.pid,
                                                       "started": "now"}))
        recipe = write_recipe(tmp_path / "r.yaml", tree(tiny_model_dir, data, out))
        assert main(["finetune", "-c", str(recipe)]) == 2
        err = one_line(capsys)
        assert "in use by another vlmtune run" in err and f"pid {holder.pid}" in err
        assert not (out / "metrics.jsonl").exists()
    finally:
        holder.kill()
        holder.wait()


def test_a_stale_lock_is_taken_over_and_released(tmp_path, capsys):
    import socket

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / ".vlmtune.lock").write_text(json.dumps({"host": socket.gethostname(), "pid": dead.pid}))
    with RunLock(tmp_path):
        assert json.loads((tmp_path / ".vlmtune.lock").read_text())["pid"] == os.getpid()
        with pytest.raises(OutputError, match="in use by another vlmtune run"):
            RunLock(tmp_path).acquire()  # even from this process: the folder is held
    assert "stale lock" in capsys.readouterr().out
    assert not (tmp_path / ".vlmtune.lock").exists()
    (tmp_path / ".vlmtune.lock").write_text(json.dumps({"host": "another-host", "pid": 1}))
    with pytest.raises(OutputError, match=r"locked by a run on host another-host.*delete"):
        RunLock(tmp_path).acquire()


def test_16_bit_images_are_scaled_not_clipped(tmp_path):
    """A 0-65535 gradient decodes to a 0-255 gradient (mean ~127), not 99% white."""
    gradient = np.linspace(0, 65535, 256 * 64).reshape(64, 256).astype(np.uint16)
    PIL.Image.fromarray(gradient).save(tmp_path / "g16.png")
    im = load_image("g16.png", tmp_path, 0)
    pixels = np.asarray(im, dtype=np.float64)
    assert im.mode == "RGB" and abs(pixels.mean() - 127.5) < 1.5 and pixels.max() == 255 and pixels.min() == 0
    assert abs(pixels[:, 128].mean() - np.asarray(gradient[:, 128], dtype=np.float64).mean() / 257) < 1


def test_exif_orientation_is_applied(tmp_path):
    """A phone photo stored sideways with EXIF orientation 6 (rotate 90 clockwise) decodes upright."""
    photo = PIL.Image.new("RGB", (40, 20), (255, 0, 0))
    photo.paste((0, 0, 255), (0, 0, 10, 20))  # a blue stripe on the stored image's left edge
    exif = PIL.Image.Exif()
    exif[0x0112] = 6
    photo.save(tmp_path / "phone.jpg", exif=exif, quality=95)
    im = load_image("phone.jpg", tmp_path, 0)
    assert im.size == (20, 40)
    top = np.asarray(im)[:5].mean((0, 1))
    assert top[2] > 200 and top[0] < 60  # the stripe is on top after the 90-degree turn


def test_repeated_roles_are_skipped_and_counted(tmp_path):
    spec = DataSource(source="x.jsonl", format="messages")
    row = {"messages": [{"role": "user", "content": "Hi"}, {"role": "user", "content": "Colour?"},
                        {"role": "assistant", "content": "Red."}]}
    with pytest.raises(SampleError) as e:
        to_conversation(row, "messages", spec, tmp_path, 3)
    assert e.value.reason == "repeated_role" and "turns 1 and 2 are both 'user'" in str(e.value)


def test_truncated_samples_are_counted_and_never_taught_to_end(tiny_model_dir, tmp_path, encoder):
    """train.overlong=truncate_text: the summary counts what was cut; the cut answer keeps no end-of-turn token."""
    data = write_data(tmp_path / "data", n=2, answer="red " * 80)
    out = tmp_path / "run"
    finetune(build_recipe(tree(tiny_model_dir, data, out, max_steps=1, max_length=100, overlong="truncate_text")))
    summary = json.loads((out / "summary.json").read_text())
    assert summary["shortened"] == {"truncate_text": 2} and summary["skipped"] == {}
    # A two-token end marker cut after its first token: that token is not trained.
    enc = encoder
    saved = enc.end_ids
    try:
        enc.end_ids = [151645, 198]  # "<|im_end|>", "\n"
        full = torch.tensor([-100, 5, 6, 151645, 198])
        cut = full[:4].clone()
        enc._never_end_a_cut_answer(cut, full)
        assert cut.tolist() == [-100, 5, 6, -100]
    finally:
        enc.end_ids = saved


def test_resume_refuses_data_that_no_longer_matches(checkpointed, tmp_path, capsys):
    _, t = copy_run(checkpointed, tmp_path)
    t = {**t, "resume": "auto", "train": {**t["train"], "max_steps": 4}}
    t["data"]["train"]["limit"] = 4
    assert main(["finetune", "-c", str(write_recipe(tmp_path / "r.yaml", t))]) == 2
    err = one_line(capsys)
    assert "training set of 8 rows, but this run's data.train has 4 rows" in err


# ---------------------------------------------------------------------------------------------------------
# One line instead of a traceback or a vague message


def test_data_file_that_is_not_utf8(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(b'{"messages": []}\n{"messages": [{"role": "user", "content": "caf\xe9"}]}\n')
    with pytest.raises(DataError, match=r"d.jsonl.*not UTF-8.*line 2.*Windows-1252.*iconv -f cp1252"):
        load_rows(DataSource(source=str(path)), "data.train")


@pytest.mark.parametrize("text, where", [("train:\n  lr: [1e-4\n", "line 3, column 1"),
                                         ("model: !!python/object/apply:os.system ['touch x']\n", "line 1, column 8")])
def test_yaml_errors_name_file_line_and_column(tmp_path, text, where):
    (tmp_path / "r.yaml").write_text(text)
    with pytest.raises(RecipeError) as e:
        load_recipe(tmp_path / "r.yaml")
    assert "r.yaml" in str(e.value) and where in str(e.value)
    if "python" in text:
        assert "plain YAML" in str(e.value) and not (tmp_path / "x").exists()


def test_model_that_needs_remote_code(tiny_model_dir, tmp_path, capsys):
    model = tmp_path / "custom-model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"model_type": "my_custom_vlm",
                                                   "auto_map": {"AutoConfig": "configuration_x.XConfig"}}))
    data = write_data(tmp_path / "data")
    t = tree(tiny_model_dir, data, tmp_path / "run")
    t["model"]["name_or_path"] = str(model)
    assert main(["finetune", "-c", str(write_recipe(tmp_path / "r.yaml", t))]) == 2
    assert "model.trust_remote_code: true" in one_line(capsys)


def test_trust_remote_code_in_processor_kwargs(tiny_model_dir, tmp_path):
    t = tree(tiny_model_dir, tmp_path / "d.jsonl", tmp_path / "run")
    t["model"]["processor_kwargs"] = {"trust_remote_code": True}
    with pytest.raises(RecipeError, match=r"model.processor_kwargs: trust_remote_code is not a processor option: "
                                          r"set model.trust_remote_code"):
        build_recipe(t)


def test_chat_template_refused_by_the_sandbox(tiny_model_dir, tmp_path, capsys):
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    (model / "chat_template.jinja").write_text("{{ ''.__class__.__mro__ }}{% for m in messages %}{% endfor %}")
    data = write_data(tmp_path / "data")
    t = tree(tiny_model_dir, data, tmp_path / "run")
    t["model"]["name_or_path"] = str(model)
    assert main(["finetune", "-c", str(write_recipe(tmp_path / "r.yaml", t))]) == 2
    err = one_line(capsys)
    assert "chat template" in err and "sandbox refused it" in err


def test_truncated_weights_file_names_it_and_the_older_checkpoint(checkpointed, tmp_path, capsys):
    out, t = copy_run(checkpointed, tmp_path)
    weights = out / "checkpoints" / "step-000002" / "trainable.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    recipe = write_recipe(tmp_path / "r.yaml", {**t, "resume": "auto", "train": {**t["train"], "max_steps": 3}})
    assert main(["finetune", "-c", str(recipe)]) == 2
    err = one_line(capsys)
    assert "trainable.safetensors has" in err and "step-000001 (resume=" in err


def test_malicious_optimizer_state_is_refused(checkpointed, tmp_path, capsys):
    out, t = copy_run(checkpointed, tmp_path)
    step = out / "checkpoints" / "step-000002"
    marker = tmp_path / "pwned"
    opt = step / "optimizer.pt"
    state = json.loads((step / "trainer_state.json").read_text())
    torch.save({"optimizer": _Payload(marker)}, opt)
    state["files"]["optimizer.pt"] = opt.stat().st_size  # a consistent forgery: the sizes match
    (step / "trainer_state.json").write_text(json.dumps(state))
    recipe = write_recipe(tmp_path / "r.yaml", {**t, "resume": "auto", "train": {**t["train"], "max_steps": 3}})
    assert main(["finetune", "-c", str(recipe)]) == 2
    err = one_line(capsys)
    assert "optimizer.pt holds objects other than tensors" in err and "weights_only=False" not in err
    assert not marker.exists()


@pytest.mark.parametrize("where", ["file", "unwritable"])
def test_unusable_output_dir(tiny_model_dir, tmp_path, capsys, where):
    data = write_data(tmp_path / "data")
    if where == "file":
        out = tmp_path / "taken"
        out.write_text("not a folder")
        expected = "is a file, not a folder"
    else:
        out = Path("/proc/vlmtune-cannot-write-here")  # a read-only file system
        expected = "cannot be written"
    assert main(["finetune", "-c", str(write_recipe(tmp_path / "r.yaml", tree(tiny_model_dir, data, out)))]) == 2
    assert expected in one_line(capsys)


def test_nonfinite_final_weights_are_not_written_and_the_summary_is_json(tiny_model_dir, tmp_path, monkeypatch,
                                                                          capsys):
    """Steps whose update turned weights into NaN, then NaN steps (skipped): final/ is refused, summary.json is
    valid JSON (NaN as null)."""
    import vlmtune.train as train_mod

    real = train_mod.train_step

    def poisoned(state, engine, plan, batches):
        result = real(state, engine, plan, batches)
        with torch.no_grad():
            next(p for p in state.model.parameters() if p.requires_grad).fill_(float("nan"))
        result.loss = float("nan")
        return result

    monkeypatch.setattr(train_mod, "train_step", poisoned)
    data = write_data(tmp_path / "data")
    out = tmp_path / "run"
    recipe = write_recipe(tmp_path / "r.yaml", tree(tiny_model_dir, data, out, max_bad_steps=5))
    assert main(["finetune", "-c", str(recipe)]) == 2
    assert "hold NaN or inf values" in one_line(capsys)
    assert not (out / "final").exists()
    summary = json.loads((out / "summary.json").read_text(), parse_constant=pytest.fail)
    assert summary["final_loss"] is None and summary["final_model"] is None and "NaN" in summary["error"]


def test_images_over_the_pixel_limit_are_skipped_before_decoding(tmp_path):
    """12000 x 12000 is under Pillow's bomb limit, but 144 M pixels: refused from the header by default."""
    PIL.Image.new("1", (12000, 12000)).save(tmp_path / "huge.png")
    with pytest.raises(SampleError) as e:
        load_image("huge.png", tmp_path, 5)
    assert e.value.reason == "image_too_large" and "data.max_image_pixels=64,000,000" in str(e.value)
    PIL.Image.new("RGB", (40, 40)).save(tmp_path / "small.png")
    with pytest.raises(SampleError, match="1,600 pixels"):
        load_image("small.png", tmp_path, 0, max_pixels=1000)


# ---------------------------------------------------------------------------------------------------------
# A full disk


def test_no_room_for_a_checkpoint_keeps_the_last_good_one(checkpointed, tmp_path, monkeypatch, capsys):
    out, t = copy_run(checkpointed, tmp_path)
    monkeypatch.setattr(output_mod, "free_bytes", lambda path: 1024)
    recipe = write_recipe(tmp_path / "r.yaml", {**t, "resume": "auto", "train": {**t["train"], "max_steps": 3}})
    assert main(["finetune", "-c", str(recipe)]) == 2
    err = one_line(capsys)
    assert "no space left on" in err and "MB needed, 0 MB free" in err and "step-000002, which is intact" in err
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-000001", "step-000002"]


def test_disk_full_in_the_middle_of_a_save_leaves_nothing_behind(checkpointed, tmp_path, monkeypatch, capsys):
    out, t = copy_run(checkpointed, tmp_path)
    real = ckpt_mod._write_torch

    def full(path, obj):
        if path.name == "rng.pt":
            raise OSError(errno.ENOSPC, "No space left on device")
        real(path, obj)

    monkeypatch.setattr(ckpt_mod, "_write_torch", full)
    recipe = write_recipe(tmp_path / "r.yaml", {**t, "resume": "auto", "train": {**t["train"], "max_steps": 3}})
    assert main(["finetune", "-c", str(recipe)]) == 2
    assert "no space left on" in one_line(capsys)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-000001", "step-000002"]


def test_a_final_save_without_room_keeps_a_resumable_checkpoint(tiny_model_dir, tmp_path, monkeypatch, capsys):
    data = write_data(tmp_path / "data")
    out = tmp_path / "run"
    monkeypatch.setattr(ckpt_mod, "hf_bytes", lambda model: 10**15)  # the final folder would need a petabyte
    recipe = write_recipe(tmp_path / "r.yaml", tree(tiny_model_dir, data, out))
    assert main(["finetune", "-c", str(recipe)]) == 2
    err = one_line(capsys)
    step = out / "checkpoints" / "step-000002"
    assert "final/ was not written" in err and str(step) in err and "vlmtune export --checkpoint" in err
    assert (step / "COMPLETE").is_file() and not (out / "final").exists() and not (out / "final.tmp").exists()
    monkeypatch.undo()
    assert main(["finetune", "-c", str(recipe), "resume=auto"]) == 0  # nothing left to train: writes final/
    assert load_file(out / "final" / "model.safetensors")


def test_inspect_reports_images_as_decoded(tiny_model_dir, tmp_path, capsys):
    photo = PIL.Image.new("RGB", (40, 20), (200, 100, 50))
    exif = PIL.Image.Exif()
    exif[0x0112] = 6
    photo.save(tmp_path / "p.jpg", exif=exif, quality=95)
    rows = [{"prompt": "Colour?", "completion": "orange", "images": ["p.jpg"]}]
    (tmp_path / "d.jsonl").write_text(json.dumps(rows[0]) + "\n")
    t = tree(tiny_model_dir, tmp_path / "d.jsonl", tmp_path / "run")
    recipe = str(write_recipe(tmp_path / "r.yaml", t))
    assert main(["inspect", "-c", recipe, "--format", "json"]) == 0
    (image,) = json.loads(capsys.readouterr().out)["images"]
    assert (image["width"], image["height"]) == (20, 40)
    assert [round(m / 10) for m in image["mean"]] == [20, 10, 5]
    assert main(["inspect", "-c", recipe, "--format", "html", "--out", str(tmp_path / "p.html")]) == 0
    page = (tmp_path / "p.html").read_text()
    assert '<img src="data:image/png;base64,' in page and "20 x 40" in page
