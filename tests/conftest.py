"""Shared fixtures: a tiny Qwen2.5-VL with the real Qwen processor, synthetic cord-v2 data, the tiny models of every
family (tests/tiny), each built once per run, and an opt-in cache of parsed processors.

The suite runs on two pytest-xdist workers (pyproject's addopts; `-n 0` runs it in one process). The tiny models
live in one folder all workers share (beside the workers' own base temps); tests/tiny's `build` takes a file lock,
so the first worker to need a model builds it and the other waits for it.
"""

from __future__ import annotations

import json
import os
from collections import OrderedDict
from functools import partial
from pathlib import Path

import pytest

# Tests never touch the network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def pytest_configure(config):
    if os.environ.get("PYTEST_XDIST_WORKER"):
        # Two workers on two cores: one torch thread each (tiny models gain nothing from intra-op threads, and two
        # threads per worker oversubscribe the cores). Subprocesses the tests start (the demo CLI) inherit it.
        import torch

        torch.set_num_threads(1)
        os.environ.setdefault("OMP_NUM_THREADS", "1")


# Under xdist (`--dist loadgroup --no-loadscope-reorder`, pyproject's addopts) an xdist_group runs on one worker,
# and groups start in collection order: the long ones go first, so that the many short tests fill the gaps at the
# end. A module grouped here shares its module fixtures (trained runs) between its tests; the tests of a module not
# grouped are handed out one by one. test_distributed.py and test_families.py mark their own groups.
GROUPS = ("test_checkpoint.py", "test_export_generate.py")
FIRST = ("test_distributed.py", *GROUPS, "test_train.py", "test_families.py", "test_guide_gemma3.py", "test_lora.py",
         "test_gemma_smolvlm.py")


def _groups(item) -> list[str]:
    return sorted({str(m.args[0] if m.args else m.kwargs.get("name", "default"))
                   for m in item.iter_markers("xdist_group")})


@pytest.hookimpl(trylast=True)  # after xdist's own hook, which turns xdist_group marks into node id suffixes
def pytest_collection_modifyitems(config, items):
    worker = bool(os.environ.get("PYTEST_XDIST_WORKER"))
    if worker:
        for item in items:
            if item.path.name in GROUPS and not _groups(item):
                item.add_marker(pytest.mark.xdist_group(item.path.stem))
    if getattr(config.option, "loadgroup", False):
        for item in items:
            names = _groups(item)
            if names and "@" not in item.nodeid:
                _add_group_suffix(item, "_".join(names))

    files: dict[Path, int] = {}
    for item in items:
        files.setdefault(item.path, len(files))

    def rank(item):
        name = item.path.name
        # test_families.py: one family's tests one after the other (it keeps the last family's model loaded).
        params = item.callspec.params if hasattr(item, "callspec") else {}
        family = params.get("name", "") if name == "test_families.py" else ""
        return (FIRST.index(name) if worker and name in FIRST else len(FIRST)), files[item.path], family

    items.sort(key=rank)  # stable: otherwise the order of collection is kept


def _add_group_suffix(item, group: str) -> None:
    """What xdist's loadgroup does to a grouped test's node id (``nodeid@group``: the scheduler's unit is the
    suffix). pytest 9.2 keeps node ids in ``item._id``, so xdist 3.8's ``item._nodeid = ...`` no longer takes effect
    and every group is silently split (pytest-dev/pytest-xdist#1386); this runs only where the suffix is missing."""
    try:
        from _pytest.nodeid import NodeId
    except ImportError:  # an older pytest: xdist's own mangling works (it would have added the suffix)
        return
    if hasattr(item, "_id"):
        item._id = NodeId.parse(f"{item.nodeid}@{group}")


def shared_dir(tmp_path_factory, name: str) -> Path:
    """A folder every xdist worker of this run sees (the plain session temp without xdist)."""
    base = tmp_path_factory.getbasetemp()
    root = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base
    out = root / name
    out.mkdir(parents=True, exist_ok=True)
    return out


@pytest.fixture(scope="session")
def tiny_root(tmp_path_factory) -> Path:
    """Where the tiny models of tests/tiny are built (once per run); see `tiny_model`."""
    return shared_dir(tmp_path_factory, "tiny-models")


@pytest.fixture(scope="session")
def tiny_model(tiny_root):
    """`tiny_model(name)`: the folder of tests/tiny's model `name`, built on first use by whichever worker."""
    from tiny import build

    return partial(build, root=tiny_root)


_PROCESSORS: OrderedDict[tuple, object] = OrderedDict()  # least recently used first
_KEEP_PROCESSORS = 4  # a real tokenizer holds 30-200 MB; a test module uses a few models at a time
_REAL: dict[str, object] = {}


def _real_load_processor():
    if "load_processor" not in _REAL:
        import vlmtune.model as model_mod

        assert model_mod.load_processor is not cached_load_processor, "patched before the original was kept"
        _REAL["load_processor"] = model_mod.load_processor
    return _REAL["load_processor"]


def _folder_stamp(path) -> tuple:
    folder = Path(path)
    if not folder.is_dir():
        return ()
    return tuple(sorted((f.name, f.stat().st_mtime_ns, f.stat().st_size) for f in folder.iterdir() if f.is_file()))


def cached_load_processor(cfg):
    """`vlmtune.model.load_processor`, memoised per model folder (and its files' mtimes and sizes), revision and
    processor options, for the few most recently used. Parsing a real tokenizer takes 1-4 s on CPU; the tests never
    change a processor they load (generation sets and restores the padding side). Errors are not cached."""
    real = _real_load_processor()
    key = (str(cfg.name_or_path), cfg.revision, cfg.trust_remote_code,
           json.dumps(cfg.processor_kwargs, sort_keys=True, default=str), _folder_stamp(cfg.name_or_path))
    if key in _PROCESSORS:
        _PROCESSORS.move_to_end(key)
    else:
        _PROCESSORS[key] = real(cfg)
        while len(_PROCESSORS) > _KEEP_PROCESSORS:
            _PROCESSORS.popitem(last=False)
    return _PROCESSORS[key]


@pytest.fixture(scope="module")
def cached_processors():
    """Opt in (`usefixtures` or an autouse fixture of a module): every processor vlmtune loads in this module's
    tests, in-process CLI runs included, comes from `cached_load_processor`."""
    import vlmtune.export as export_mod
    import vlmtune.model as model_mod

    _real_load_processor()
    patch = pytest.MonkeyPatch()
    patch.setattr(model_mod, "load_processor", cached_load_processor)
    patch.setattr(export_mod, "load_processor", cached_load_processor)
    yield cached_load_processor
    patch.undo()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    from filelock import FileLock

    from vlmtune.demo import build_tiny_qwen2_5_vl

    root = shared_dir(tmp_path_factory, "models")
    with FileLock(str(root / "tiny-qwen2.5-vl.lock")):
        return build_tiny_qwen2_5_vl(root / "tiny-qwen2.5-vl")


@pytest.fixture(scope="session")
def cord_dir(tmp_path_factory):
    from vlmtune.data.synthetic import write_synthetic_cord

    return write_synthetic_cord(tmp_path_factory.mktemp("data") / "cord", n_train=16, n_validation=4)


@pytest.fixture(scope="session")
def processor(tiny_model_dir):
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(tiny_model_dir)


@pytest.fixture(scope="session")
def encoder(processor):
    from vlmtune.encode import SampleEncoder
    from vlmtune.families import family_for

    return SampleEncoder(processor, family_for("qwen2_5_vl"), max_length=1024)


@pytest.fixture(scope="module")
def image_batch(cord_dir, encoder):
    """Two collated validation receipts of the tiny Qwen2.5-VL."""
    from vlmtune.batching import collate
    from vlmtune.config import DataSource
    from vlmtune.encode import EncodedDataset

    ds = EncodedDataset.of(DataSource(source=str(cord_dir), format="cord_v2", split="validation"), encoder, "v")
    return collate([ds[0], ds[1]], pad_id=151643)


def small_recipe(model_dir, data_dir, out_dir, **train) -> dict:
    """A recipe tree for fast loop tests on the tiny model."""
    return {
        "output_dir": str(out_dir),
        "model": {"name_or_path": str(model_dir)},
        "data": {"train": {"source": str(data_dir), "format": "cord_v2"},
                 "validation": {"source": str(data_dir), "format": "cord_v2", "split": "validation"}},
        "train": {"max_steps": 2, "micro_batch_size": 1, "global_batch_size": 2, "lr": 1e-3, "seed": 0,
                  "max_length": 512, **train},
    }


@pytest.fixture(scope="session")
def page_data(tmp_path_factory) -> Path:
    """Document pages in the nemotron_parse format: 6 train / 2 validation rows of white pages with dark text
    bars, their layout as blocks (boxes in pixels) in train.jsonl / validation.jsonl."""
    import PIL.Image
    import PIL.ImageDraw

    root = tmp_path_factory.mktemp("pages")
    classes = ("Title", "Text", "Table", "Caption")
    for split, n in (("train", 6), ("validation", 2)):
        rows = []
        for i in range(n):
            page = PIL.Image.new("RGB", (120, 160), "white")
            draw = PIL.ImageDraw.Draw(page)
            blocks = []
            for j in range(1 + i % 3):
                box = [10, 10 + 40 * j, 110 - 10 * j, 35 + 40 * j]
                draw.rectangle(box, fill=(40, 40, 40))
                blocks.append({"bbox": box, "class": classes[(i + j) % 4], "text": f"Block {j} of page {i}."})
            page.save(root / f"{split}-{i}.png")
            rows.append({"image": f"{split}-{i}.png", "blocks": blocks})
        (root / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root
