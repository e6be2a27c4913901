"""CPU timing of issue 19's levers 1, 2 and 5 on bench/compare.py's model, each against its stock path.

    python bench/attention_cpu.py [--repeats 5] [--compile] [--out FILE.json]

1. Vision tower, forward + backward over 2 receipts as the cord-v2 recipes read them (864 x 1296 at max_pixels
   802,816: 4,056 patches each): transformers' tower (sdpa window by window, ``lengths.tolist()`` per block)
   against ``train.attention=varlen`` (one grouped call per block, inputs computed on the host: that time is
   included).
2. Language model, forward + backward over text samples of 1,176, 430, 800 and 95 tokens: padded rows, one packed
   row through ``segment_sdpa`` (samples read off transformers' N x N mask), and through ``vlmtune_varlen`` (the
   batcher's bounds); CPU seconds, interleaved.
3. With --compile: regional torch.compile (inductor) of the whole model: the first packed step (compile
   included) and the steady step, against eager.
CPU seconds (process time: steadier than wall time on a shared machine), median of --repeats runs after one
warm-up; the results agree with the stock path (printed).
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchlib  # bench/ is not a package: found through sys.path

from vlmtune.attention import host_inputs, packed_row_inputs, setup_attention
from vlmtune.vision import use_varlen_vision_attention


def timed(fn, repeats: int) -> float:
    """Median CPU seconds (process time, all threads) of `fn` after a warm-up."""
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.process_time()
        fn()
        times.append(time.process_time() - t0)
    return statistics.median(times)


def receipt_grid() -> torch.Tensor:
    from PIL import Image
    from transformers import AutoProcessor

    from vlmtune.demo import ASSETS

    processor = AutoProcessor.from_pretrained(ASSETS, min_pixels=3136, max_pixels=802_816)
    image = Image.new("RGB", (864, 1296), "white")
    return processor.image_processor(images=[image, image], return_tensors="pt")["image_grid_thw"]


def vision(model, repeats: int) -> dict:
    tower = model.model.visual
    grid = receipt_grid()
    cfg = tower.config
    pixels = torch.randn(int(grid.prod(-1).sum()), cfg.in_channels * cfg.temporal_patch_size * cfg.patch_size ** 2)
    stock = copy.deepcopy(tower)
    use_varlen_vision_attention(tower)
    extras = host_inputs(model)

    def run_stock():
        stock.zero_grad(set_to_none=True)
        out = stock(pixels, grid_thw=grid).pooler_output
        out.sum().backward()
        return out

    def run_varlen():
        tower.zero_grad(set_to_none=True)
        inputs = {k.removeprefix("image_"): v for k, v in extras({"image_grid_thw": grid}).items()}
        out = tower(pixels, grid_thw=grid, **inputs).pooler_output
        out.sum().backward()
        return out

    diff = float((run_stock() - run_varlen()).abs().max())
    windows = len(extras({"image_grid_thw": grid})["image_cu_window_seqlens"]) - 1
    return {"patches": int(grid.prod(-1).sum()), "windows": windows, "max_abs_difference": diff,
            "stock_s": timed(run_stock, repeats), "varlen_s": timed(run_varlen, repeats)}


def text_row(lengths: list[int]) -> dict:
    """One packed row of text samples as vlmtune's batcher lays it out for Qwen (a text row and 3 mRoPE rows of
    positions that restart at 0 per sample; a sample's first token no target)."""
    torch.manual_seed(0)
    ids = torch.randint(0, 150_000, (1, sum(lengths)))
    positions = torch.cat([torch.arange(n) for n in lengths])[None]
    labels = ids.masked_fill(positions == 0, -100)
    return {"input_ids": ids, "position_ids": positions[None].expand(4, -1, -1), "labels": labels}


def padded_rows(row: dict, lengths: list[int]) -> dict:
    """The same samples as right-padded rows with an attention mask (no packing)."""
    ids = torch.full((len(lengths), max(lengths)), 151643)
    mask = torch.zeros_like(ids)
    for i, chunk in enumerate(row["input_ids"][0].split(lengths)):
        ids[i, :len(chunk)], mask[i, :len(chunk)] = chunk, 1
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}


def text(model_dir: Path, repeats: int) -> dict:
    """CPU seconds (process time: steadier than wall time on a shared machine) of forward + backward, the three
    ways interleaved round by round."""
    from vlmtune.config import ModelConfig
    from vlmtune.loss import loss_sum
    from vlmtune.model import load_model

    lengths = [1176, 430, 800, 95]
    row = text_row(lengths)
    runs = {}
    for name, mode, batch in (("padded", None, padded_rows(row, lengths)), ("segment_sdpa", "stock", row),
                              ("varlen", "varlen", {**row, **packed_row_inputs(row["position_ids"])})):
        model, _, _ = load_model(ModelConfig(name_or_path=str(model_dir)), torch.device("cpu"))
        if mode:
            setup_attention(model, mode, packed=True)
        runs[name] = (model, batch)

    def step(model, batch) -> float:
        model.zero_grad(set_to_none=True)
        loss = loss_sum(model, batch)
        loss.backward()
        return float(loss.detach())

    losses = {name: step(*run) for name, run in runs.items()}
    seconds: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            t0 = time.process_time()
            step(*run)
            seconds[name].append(time.process_time() - t0)
    return {"lengths": lengths, "losses": losses,
            **{f"{name}_cpu_s": statistics.median(v) for name, v in seconds.items()}}


def compiled(model_dir: Path) -> dict:
    from vlmtune.compile import compile_regions
    from vlmtune.config import ModelConfig
    from vlmtune.loss import loss_sum
    from vlmtune.model import load_model

    model, _, _ = load_model(ModelConfig(name_or_path=str(model_dir)), torch.device("cpu"))
    setup_attention(model, "varlen", packed=True)
    eager = copy.deepcopy(model)
    compile_regions(model)
    out = {"steps_s": [], "eager_s": []}
    for i, lengths in enumerate(([900, 300], [700, 640, 90], [1200, 210], [500, 500, 333])):
        batch = text_row(lengths)
        batch.update(packed_row_inputs(batch["position_ids"]))
        for m, key in ((model, "steps_s"), (eager, "eager_s")):
            t0 = time.perf_counter()
            m.zero_grad(set_to_none=True)
            loss_sum(m, batch).backward()
            out[key].append(time.perf_counter() - t0)
        print(f"  compile step {i}: {out['steps_s'][-1]:.2f} s (eager {out['eager_s'][-1]:.2f} s)", flush=True)
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--compile", action="store_true")
    p.add_argument("--workdir", type=Path, default=Path("/tmp/vlmtune-attention-cpu"))
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    model_dir = args.workdir / "model"
    benchlib.build_model(model_dir, benchlib.bench_model_config(), pixels={"min_pixels": 3136, "max_pixels": 802_816})
    from vlmtune.config import ModelConfig
    from vlmtune.model import load_model

    model, _, _ = load_model(ModelConfig(name_or_path=str(model_dir)), torch.device("cpu"))
    result = {"threads": torch.get_num_threads(), "torch": torch.__version__}
    result["vision"] = vision(model, args.repeats)
    v = result["vision"]
    print(f"vision tower, {v['patches']} patches in {v['windows']} windows, CPU s: stock {v['stock_s']:.3f}, varlen "
          f"{v['varlen_s']:.3f} ({v['stock_s'] / v['varlen_s']:.2f}x); max |difference| "
          f"{v['max_abs_difference']:.1e}", flush=True)
    result["text"] = text(model_dir, args.repeats)
    t = result["text"]
    print(f"text samples {t['lengths']}, CPU s per forward + backward: padded {t['padded_cpu_s']:.2f}, packed with "
          f"segment_sdpa {t['segment_sdpa_cpu_s']:.2f}, packed with varlen {t['varlen_cpu_s']:.2f}; losses "
          f"{t['losses']}", flush=True)
    if args.compile:
        result["compile"] = compiled(model_dir)
    if args.out:
        args.out.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
