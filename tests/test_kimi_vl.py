"""Kimi-VL without remote code (vlmtune/models/kimi_vl): what is specific to it, against references built here from
the documented facts (tests/assets/kimi-vl/SOURCE.md), not from the code under test.

- the official config and weight layout: the full-size model on the meta device has exactly the official tensor
  names and shapes; a checkpoint written in the official layout loads with nothing missing or unexpected, every
  tensor where the documented conversion puts it; what vlmtune saves is the official layout again;
- MoonViT + projector against a plain-torch MoonViT written from its description (complex-pair 2-D rotary, bicubic
  position table, fused q|k|v), and the text model against transformers' DeepseekV3ForCausalLM;
- the image processor's token counts and pixels against the documented algorithm; the processor's placeholder
  expansion; the chat format; the tokenizer against a reference tiktoken BPE; LoRA on the fused experts.
"""

from __future__ import annotations

import base64
import copy
import json
import math
import re
import shutil
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import regex
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tiny.kimi_vl import KIMI_VL

from vlmtune.config import FreezeConfig, ModelConfig, PeftConfig
from vlmtune.encode import SampleEncoder
from vlmtune.families import family_for
from vlmtune.model import load_model
from vlmtune.models import register_native_models
from vlmtune.views import trained_runs

CPU = torch.device("cpu")
FAMILY = family_for("kimi_vl")
SPECIAL_IDS = {"[BOS]": 163584, "[EOS]": 163585, "<|im_end|>": 163586, "<|im_user|>": 163587,
               "<|im_assistant|>": 163588, "<|im_system|>": 163594, "<|im_middle|>": 163601,
               "<|media_start|>": 163602, "<|media_content|>": 163603, "<|media_end|>": 163604,
               "<|media_pad|>": 163605, "[UNK]": 163838, "[PAD]": 163839}


@pytest.fixture(scope="module")
def tiny(tiny_model):
    register_native_models()
    return tiny_model("kimi_vl")


@pytest.fixture(scope="module")
def loaded(tiny):
    model, processor, _ = load_model(ModelConfig(name_or_path=str(tiny)), CPU)
    return model.eval(), processor


def picture(size=(64, 48), seed=0) -> PIL.Image.Image:
    rng = np.random.default_rng(seed)
    return PIL.Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


# ---------------------------------------------------------------------------------------------------------
# The official layout, derived from the documented module structure (independent of vlmtune's classes)


def expand_key_patterns(path: Path) -> dict[str, tuple[int, ...]]:
    """tests/assets/kimi-vl/weight_keys.txt: `name shape` lines, `{a..b}` standing for every integer a..b."""
    keys: dict[str, tuple[int, ...]] = {}
    for line in path.read_text().splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        name, shape = line.split()
        names = [name]
        while any("{" in n for n in names):
            names = [n[:m.start()] + str(i) + n[m.end():] for n in names
                     for m in [re.search(r"\{(\d+)\.\.(\d+)\}", n)] for i in range(int(m[1]), int(m[2]) + 1)]
        keys.update({n: tuple(int(s) for s in shape.split(",")) for n in names})
    return keys


def official_weight_shapes(config: dict) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor of an official checkpoint with this config.json (the module structure the
    vLLM / NeMo AutoModel loaders document: MoonViT `encoder.blocks.N.{norm0,norm1,wqkv,wo,mlp.fc0,mlp.fc1}`,
    projector `pre_norm, linear_1, linear_2`, DeepSeek-V3 text model with per-expert weights)."""
    v, t = config["vision_config"], config["text_config"]
    d, p, i, k = v["hidden_size"], v["patch_size"], v["intermediate_size"], v["merge_kernel_size"]
    out = {"vision_tower.patch_embed.proj.weight": (d, 3, p, p), "vision_tower.patch_embed.proj.bias": (d,),
           "vision_tower.patch_embed.pos_emb.weight": (v["init_pos_emb_height"], v["init_pos_emb_width"], d)}
    for b in range(v["num_hidden_layers"]):
        for name, shape in [("norm0.weight", (d,)), ("norm0.bias", (d,)), ("norm1.weight", (d,)), ("norm1.bias", (d,)),
                            ("wqkv.weight", (3 * d, d)), ("wqkv.bias", (3 * d,)), ("wo.weight", (d, d)),
                            ("wo.bias", (d,)), ("mlp.fc0.weight", (i, d)), ("mlp.fc0.bias", (i,)),
                            ("mlp.fc1.weight", (d, i)), ("mlp.fc1.bias", (d,))]:
            out[f"vision_tower.encoder.blocks.{b}.{name}"] = shape
    out.update({"vision_tower.encoder.final_layernorm.weight": (d,), "vision_tower.encoder.final_layernorm.bias": (d,)})
    merged, h = d * k[0] * k[1], t["hidden_size"]
    proj = "multi_modal_projector"
    out.update({f"{proj}.pre_norm.weight": (d,), f"{proj}.pre_norm.bias": (d,),
                f"{proj}.linear_1.weight": (merged, merged), f"{proj}.linear_1.bias": (merged,),
                f"{proj}.linear_2.weight": (h, merged), f"{proj}.linear_2.bias": (h,)})
    lm, vocab = "language_model.model", t["vocab_size"]
    out.update({f"{lm}.embed_tokens.weight": (vocab, h), f"{lm}.norm.weight": (h,),
                "language_model.lm_head.weight": (vocab, h)})
    heads, nope, rope, vd, kv = (t["num_attention_heads"], t["qk_nope_head_dim"], t["qk_rope_head_dim"],
                                 t["v_head_dim"], t["kv_lora_rank"])
    mi, shared, experts = t["moe_intermediate_size"], t["moe_intermediate_size"] * t["n_shared_experts"], \
        t["n_routed_experts"]
    assert t["q_lora_rank"] is None  # Kimi-VL-A3B projects queries directly
    for layer in range(t["num_hidden_layers"]):
        pre = f"{lm}.layers.{layer}"
        out.update({f"{pre}.input_layernorm.weight": (h,), f"{pre}.post_attention_layernorm.weight": (h,),
                    f"{pre}.self_attn.q_proj.weight": (heads * (nope + rope), h),
                    f"{pre}.self_attn.kv_a_proj_with_mqa.weight": (kv + rope, h),
                    f"{pre}.self_attn.kv_a_layernorm.weight": (kv,),
                    f"{pre}.self_attn.kv_b_proj.weight": (heads * (nope + vd), kv),
                    f"{pre}.self_attn.o_proj.weight": (h, heads * vd)})
        if layer < t["first_k_dense_replace"]:
            ffn = t["intermediate_size"]
            out.update({f"{pre}.mlp.gate_proj.weight": (ffn, h), f"{pre}.mlp.up_proj.weight": (ffn, h),
                        f"{pre}.mlp.down_proj.weight": (h, ffn)})
            continue
        out.update({f"{pre}.mlp.gate.weight": (experts, h), f"{pre}.mlp.gate.e_score_correction_bias": (experts,),
                    f"{pre}.mlp.shared_experts.gate_proj.weight": (shared, h),
                    f"{pre}.mlp.shared_experts.up_proj.weight": (shared, h),
                    f"{pre}.mlp.shared_experts.down_proj.weight": (h, shared)})
        for e in range(experts):
            out.update({f"{pre}.mlp.experts.{e}.gate_proj.weight": (mi, h),
                        f"{pre}.mlp.experts.{e}.up_proj.weight": (mi, h),
                        f"{pre}.mlp.experts.{e}.down_proj.weight": (h, mi)})
    return out


def official_config() -> dict:
    return json.loads((KIMI_VL / "config.json").read_text())


def test_the_key_fixture_is_the_documented_structure():
    fixture = expand_key_patterns(KIMI_VL / "weight_keys.txt")
    assert fixture == official_weight_shapes(official_config())
    total = sum(math.prod(s) for s in fixture.values())
    vision = sum(math.prod(s) for n, s in fixture.items() if n.startswith("vision_tower"))
    # The model card: 16B parameters in all, a 400M MoonViT.
    assert 15.5e9 < total < 16.8e9 and 0.38e9 < vision < 0.43e9, (total, vision)


def test_official_config_loads_without_remote_code_and_saves_its_fields(tmp_path):
    from transformers import AutoConfig, DeepseekV3Config

    from vlmtune.models.kimi_vl.configuration import KimiVLConfig, MoonViTConfig

    register_native_models()
    shutil.copyfile(KIMI_VL / "config.json", tmp_path / "config.json")  # has an auto_map to remote code
    config = AutoConfig.from_pretrained(tmp_path)  # no trust_remote_code
    assert isinstance(config, KimiVLConfig) and isinstance(config.vision_config, MoonViTConfig)
    assert isinstance(config.text_config, DeepseekV3Config)
    text = config.text_config
    assert (text.num_local_experts, text.num_experts_per_tok, text.first_k_dense_replace, text.q_lora_rank) == \
        (64, 6, 1, None)
    assert text.rope_parameters == {"rope_type": "default", "rope_theta": 800000.0} and text.rope_interleave
    assert text.num_nextn_predict_layers == 0  # no MTP weights in the checkpoint
    config.save_pretrained(tmp_path / "out")
    saved = json.loads((tmp_path / "out" / "config.json").read_text())
    official = official_config()
    assert saved["architectures"] == ["KimiVLForConditionalGeneration"] and saved["model_type"] == "kimi_vl"
    for section in ("", "text_config", "vision_config"):
        want = official[section] if section else official
        got = saved[section] if section else saved
        for key, value in want.items():
            if key in ("text_config", "vision_config", "auto_map", "transformers_version", "torch_dtype"):
                continue
            assert got.get(key) == value, f"{section or 'config'}.{key}: saved {got.get(key)!r}, official {value!r}"


def test_full_size_model_on_meta_device_has_exactly_the_official_tensors():
    """The model built from the official config, its state dict converted back as saving does, has the official
    names and shapes, no more, no less (what from_pretrained of the real checkpoint checks)."""
    from transformers import AutoConfig, AutoModelForImageTextToText
    from transformers.core_model_loading import revert_weight_conversion

    register_native_models()
    config = AutoConfig.for_model(**official_config())
    with torch.device("meta"):
        model = AutoModelForImageTextToText.from_config(config)
    saved = revert_weight_conversion(model, model.state_dict())
    want = expand_key_patterns(KIMI_VL / "weight_keys.txt")
    got = {k: tuple(v.shape) for k, v in saved.items()}
    assert sorted(set(got) - set(want))[:5] == [] and sorted(set(want) - set(got))[:5] == []
    assert {k: s for k, s in got.items() if want[k] != s} == {}


def tiny_official_config(layers: int = 2) -> dict:
    cfg = official_config()
    cfg["vision_config"].update(hidden_size=16, intermediate_size=24, num_attention_heads=2, num_hidden_layers=layers,
                                init_pos_emb_height=4, init_pos_emb_width=4)
    cfg["text_config"].update(hidden_size=16, intermediate_size=24, moe_intermediate_size=8, num_hidden_layers=3,
                              num_attention_heads=2, num_key_value_heads=2, n_routed_experts=4, num_experts_per_tok=2,
                              kv_lora_rank=8, qk_nope_head_dim=4, qk_rope_head_dim=4, v_head_dim=4, vocab_size=64,
                              bos_token_id=1, eos_token_id=2, pad_token_id=3)
    return cfg


def test_a_checkpoint_in_the_official_layout_loads_every_tensor_where_it_belongs(tmp_path):
    """Random tensors under the official names (and a config with an auto_map, as the real one) load with nothing
    missing, unexpected or mismatched; each parameter equals its checkpoint tensor after the documented conversion:
    wqkv split in three, q and k rows from complex pairs to half-split order, experts stacked per layer."""
    from transformers import AutoModelForImageTextToText

    register_native_models()
    cfg = tiny_official_config()
    torch.manual_seed(0)
    ckpt = {name: torch.randn(shape) for name, shape in official_weight_shapes(cfg).items()}
    save_file(ckpt, tmp_path / "model.safetensors", metadata={"format": "pt"})
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    model, info = AutoModelForImageTextToText.from_pretrained(tmp_path, output_loading_info=True, dtype=torch.float32)
    assert {k: v for k, v in info.items() if v} == {}
    got = model.state_dict()
    # Per vision layer wqkv weight + bias -> q, k, v (+4); per MoE layer 4 x 3 expert matrices -> 2 fused (-10).
    assert len(got) == len(ckpt) + 4 * 2 - 10 * 2

    heads = cfg["vision_config"]["num_attention_heads"]

    def complex_to_half(t: torch.Tensor) -> torch.Tensor:  # per head: pairs (2j, 2j+1) -> (j, j + half)
        head = t.shape[0] // heads
        order = torch.cat([torch.arange(0, head, 2), torch.arange(1, head, 2)])
        return t.reshape(heads, head, *t.shape[1:])[:, order].reshape(t.shape)

    for b in range(cfg["vision_config"]["num_hidden_layers"]):
        src, dst = f"vision_tower.encoder.blocks.{b}", f"vision_tower.layers.{b}"
        for kind in ("weight", "bias"):
            q, k, v = ckpt[f"{src}.wqkv.{kind}"].chunk(3)
            assert torch.equal(got[f"{dst}.attn.q_proj.{kind}"], complex_to_half(q))
            assert torch.equal(got[f"{dst}.attn.k_proj.{kind}"], complex_to_half(k))
            assert torch.equal(got[f"{dst}.attn.v_proj.{kind}"], v)
            for a, z in (("norm0", "norm1"), ("norm1", "norm2"), ("mlp.fc0", "mlp.fc1"), ("mlp.fc1", "mlp.fc2"),
                         ("wo", "attn.proj")):
                assert torch.equal(got[f"{dst}.{z}.{kind}"], ckpt[f"{src}.{a}.{kind}"])
    assert torch.equal(got["vision_tower.patch_embed.pos_emb.position_embeddings"],
                       ckpt["vision_tower.patch_embed.pos_emb.weight"])
    assert torch.equal(got["multi_modal_projector.in_proj.weight"], ckpt["multi_modal_projector.linear_1.weight"])
    for layer in (1, 2):
        pre = f"language_model.model.layers.{layer}.mlp.experts"
        gate_up = torch.stack([torch.cat([ckpt[f"{pre}.{e}.gate_proj.weight"], ckpt[f"{pre}.{e}.up_proj.weight"]])
                               for e in range(4)])
        assert torch.equal(got[f"{pre}.gate_up_proj"], gate_up)
        down = torch.stack([ckpt[f"{pre}.{e}.down_proj.weight"] for e in range(4)])
        assert torch.equal(got[f"{pre}.down_proj"], down)
    assert torch.equal(got["language_model.model.layers.1.mlp.gate.e_score_correction_bias"],
                       ckpt["language_model.model.layers.1.mlp.gate.e_score_correction_bias"])

    # And saving gives the checkpoint back, name for name, bit for bit.
    model.save_pretrained(tmp_path / "again")
    again = load_file(tmp_path / "again" / "model.safetensors")
    assert again.keys() == ckpt.keys() and all(torch.equal(again[k], ckpt[k]) for k in ckpt)


# ---------------------------------------------------------------------------------------------------------
# What vlmtune saves


def test_saved_folder_is_the_official_layout_and_reloads(loaded, tiny, tmp_path):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from vlmtune.checkpoint import save_hf
    from vlmtune.models.kimi_vl.tokenization import read_tiktoken_ranks

    model, processor = loaded
    out = save_hf(model, processor, tmp_path / "final")
    files = {f.name for f in out.iterdir()}
    assert {"config.json", "model.safetensors", "generation_config.json", "preprocessor_config.json",
            "tokenizer_config.json", "tiktoken.model", "chat_template.jinja"} <= files
    assert "processor_config.json" not in files  # the image processor's settings are in preprocessor_config.json
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["KimiVLForConditionalGeneration"] and config["model_type"] == "kimi_vl"
    assert config["text_config"]["rope_theta"] == 800000.0 and config["text_config"]["n_routed_experts"] == 4
    weights = load_file(out / "model.safetensors")
    assert {k: tuple(v.shape) for k, v in weights.items()} == official_weight_shapes(config)

    pre = json.loads((out / "preprocessor_config.json").read_text())
    official = json.loads((KIMI_VL / "preprocessor_config.json").read_text())
    official.pop("auto_map")  # remote code's entry points: not carried over (see README)
    assert {k: pre.get(k) for k in official} == official
    tok = json.loads((out / "tokenizer_config.json").read_text())
    assert tok["tokenizer_class"] == "TikTokenTokenizer"
    assert {t["content"]: int(i) for i, t in tok["added_tokens_decoder"].items()
            if t["content"] in SPECIAL_IDS} == SPECIAL_IDS
    roles = (tok["bos_token"], tok["eos_token"], tok["pad_token"], tok["unk_token"])
    assert roles == ("[BOS]", "[EOS]", "[PAD]", "[UNK]")
    assert read_tiktoken_ranks(out / "tiktoken.model") == read_tiktoken_ranks(tiny / "tiktoken.model")
    assert (out / "chat_template.jinja").read_text() == (KIMI_VL / "chat_template.jinja").read_text()

    reloaded = AutoModelForImageTextToText.from_pretrained(out).eval()
    batch = processor(text=["<|media_start|>image<|media_content|><|media_pad|><|media_end|>Hi"], images=[picture()],
                      return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**batch).logits, model(**batch).logits, atol=0, rtol=0)
    assert type(AutoProcessor.from_pretrained(out)).__name__ == "KimiVLProcessor"


def test_remote_code_files_travel_with_the_processor(loaded, tiny, tmp_path):
    """A checkpoint with remote code (auto_map entries and their modules, as the official ones have): the modules
    are copied along when the processor is saved, so a saved folder loads in remote-code engines as the original
    does; a checkpoint without them (the tiny model's folder) gets none."""
    from transformers import AutoProcessor

    source = tmp_path / "official"
    shutil.copytree(tiny, source)
    for name in ("config.json", "preprocessor_config.json", "tokenizer_config.json"):  # the official auto_maps
        mine, official = json.loads((source / name).read_text()), json.loads((KIMI_VL / name).read_text())
        (source / name).write_text(json.dumps({**mine, "auto_map": official["auto_map"]}))
    modules = ["configuration_kimi_vl.py", "image_processing_kimi_vl.py", "modeling_kimi_vl.py",
               "processing_kimi_vl.py", "tokenization_moonshot.py"]
    for name in modules:
        (source / name).write_text(f"# {name}\n")
    AutoProcessor.from_pretrained(source).save_pretrained(tmp_path / "saved")
    assert sorted(p.name for p in (tmp_path / "saved").glob("*.py")) == modules
    assert (tmp_path / "saved" / "tokenization_moonshot.py").read_text() == "# tokenization_moonshot.py\n"
    _, processor = loaded
    processor.save_pretrained(tmp_path / "plain")
    assert list((tmp_path / "plain").glob("*.py")) == []


# ---------------------------------------------------------------------------------------------------------
# Numerics: MoonViT + projector against a reference written from the description; the text model against
# transformers' DeepSeek-V3


def moonvit_reference(w: dict[str, torch.Tensor], vcfg: dict, pixel_values: torch.Tensor,
                      grid_hws: torch.Tensor) -> torch.Tensor:
    """MoonViT + Kimi-VL's projector from the official-layout weights `w`, as described: the learned position table
    resampled bicubically to each image's grid, pre-norm blocks with a fused biased q|k|v and 2-D rotary on complex
    pairs (pair 2j turns by the patch column, 2j+1 by its row, both at 10000^(-4j/head_dim)), attention within each
    image, GELU-tanh MLPs, a final LayerNorm; then each 2x2 patch group is LayerNormed per patch, concatenated,
    linear, GELU, linear."""
    d, heads, p = vcfg["hidden_size"], vcfg["num_attention_heads"], vcfg["patch_size"]
    hd, kh, kw = d // heads, *vcfg["merge_kernel_size"]
    x = F.conv2d(pixel_values, w["vision_tower.patch_embed.proj.weight"], w["vision_tower.patch_embed.proj.bias"],
                 stride=p).flatten(1)
    table = w["vision_tower.patch_embed.pos_emb.weight"]
    grids = [tuple(g) for g in grid_hws.tolist()]
    pos = [table.flatten(0, 1) if g == tuple(table.shape[:2]) else
           F.interpolate(table.permute(2, 0, 1)[None], size=g, mode="bicubic").squeeze(0).permute(1, 2, 0).flatten(0, 1)
           for g in grids]
    x = x + torch.cat(pos)
    rows = torch.cat([torch.arange(h).repeat_interleave(wd) for h, wd in grids]).float()
    cols = torch.cat([torch.arange(wd).repeat(h) for h, wd in grids]).float()
    inv = 10000.0 ** (-4 * torch.arange(hd // 4).float() / hd)
    angles = torch.stack([cols[:, None] * inv, rows[:, None] * inv], dim=-1).flatten(1)  # [N, hd/2]
    turn = torch.polar(torch.ones_like(angles), angles)[:, None, :]

    def rotate(t: torch.Tensor) -> torch.Tensor:  # [N, heads, hd]
        return torch.view_as_real(torch.view_as_complex(t.reshape(*t.shape[:-1], -1, 2)) * turn).flatten(-2)

    def ln(t: torch.Tensor, name: str) -> torch.Tensor:
        return F.layer_norm(t, (t.shape[-1],), w[f"{name}.weight"], w[f"{name}.bias"], eps=1e-5)

    sizes = [h * wd for h, wd in grids]
    for b in range(vcfg["num_hidden_layers"]):
        blk = f"vision_tower.encoder.blocks.{b}"
        qkv = F.linear(ln(x, f"{blk}.norm0"), w[f"{blk}.wqkv.weight"], w[f"{blk}.wqkv.bias"])
        q, k, v = qkv.view(-1, 3, heads, hd).unbind(1)
        q, k = rotate(q), rotate(k)
        outs = []
        for qi, ki, vi in zip(q.split(sizes), k.split(sizes), v.split(sizes), strict=True):
            scores = torch.einsum("nhd,mhd->hnm", qi, ki) / math.sqrt(hd)
            outs.append(torch.einsum("hnm,mhd->nhd", scores.softmax(-1), vi).flatten(1))
        x = x + F.linear(torch.cat(outs), w[f"{blk}.wo.weight"], w[f"{blk}.wo.bias"])
        hidden = F.gelu(F.linear(ln(x, f"{blk}.norm1"), w[f"{blk}.mlp.fc0.weight"], w[f"{blk}.mlp.fc0.bias"]),
                        approximate="tanh")
        x = x + F.linear(hidden, w[f"{blk}.mlp.fc1.weight"], w[f"{blk}.mlp.fc1.bias"])
    x = ln(x, "vision_tower.encoder.final_layernorm")
    groups = torch.cat([t.view(h // kh, kh, wd // kw, kw, d).permute(0, 2, 1, 3, 4).reshape(-1, kh * kw, d)
                        for t, (h, wd) in zip(x.split(sizes), grids, strict=True)])
    y = ln(groups, "multi_modal_projector.pre_norm").flatten(1)
    y = F.gelu(F.linear(y, w["multi_modal_projector.linear_1.weight"], w["multi_modal_projector.linear_1.bias"]))
    return F.linear(y, w["multi_modal_projector.linear_2.weight"], w["multi_modal_projector.linear_2.bias"])


def test_vision_tower_and_projector_match_the_moonvit_reference(loaded, tiny):
    """Grids other than the position table's 8x8 (resampled) and equal to it (taken as is), two images at once."""
    model, processor = loaded
    weights = load_file(tiny / "model.safetensors")
    vcfg = json.loads((tiny / "config.json").read_text())["vision_config"]
    images = processor.image_processor([picture((64, 48), 1), picture((112, 112), 2), picture((30, 90), 3)])
    assert images["image_grid_hws"].tolist() == [[4, 6], [8, 8], [8, 4]]
    with torch.no_grad():
        got = model.get_image_features(images["pixel_values"], images["image_grid_hws"])
        want = moonvit_reference(weights, vcfg, images["pixel_values"], images["image_grid_hws"])
    assert got.shape == (6 + 16 + 8, model.config.text_config.hidden_size)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=2e-5)


def test_text_model_is_transformers_deepseek_v3(loaded, tiny, tmp_path):
    """The language model, loaded on its own by transformers' DeepseekV3ForCausalLM from the saved language_model.*
    tensors, gives the same logits for text; with an image, the same as feeding it the scattered image features."""
    from transformers import DeepseekV3ForCausalLM

    model, processor = loaded
    weights = load_file(tiny / "model.safetensors")
    text_weights = {k.removeprefix("language_model."): v for k, v in weights.items() if k.startswith("language_model.")}
    save_file(text_weights, tmp_path / "model.safetensors", metadata={"format": "pt"})
    model.config.text_config.save_pretrained(tmp_path)
    reference = DeepseekV3ForCausalLM.from_pretrained(tmp_path).eval()
    text = processor.apply_chat_template([{"role": "user", "content": [{"type": "text", "text": "Colour?"}]}],
                                         tokenize=False, add_generation_prompt=True)
    batch = processor(text=[text], return_tensors="pt")
    conv = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Colour?"}]}]
    with_image = processor(text=[processor.apply_chat_template(conv, tokenize=False)], images=[picture()],
                           return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).logits, reference(**batch).logits, atol=0, rtol=0)
        embeds = reference.get_input_embeddings()(with_image["input_ids"])
        mask = with_image["input_ids"] == SPECIAL_IDS["<|media_pad|>"]
        embeds[mask] = model.get_image_features(with_image["pixel_values"], with_image["image_grid_hws"])
        torch.testing.assert_close(model(**with_image).logits,
                                   reference(inputs_embeds=embeds, attention_mask=with_image["attention_mask"]).logits,
                                   atol=0, rtol=0)


def test_placeholder_count_mismatch_is_a_clear_error(loaded):
    model, processor = loaded
    batch = processor(text=["<|media_pad|>x"], images=[picture()], return_tensors="pt")
    batch["input_ids"] = batch["input_ids"][:, 1:]
    batch["attention_mask"] = batch["attention_mask"][:, 1:]
    with pytest.raises(ValueError, match=r"5 <\|media_pad\|> tokens but its images give 6 image tokens"):
        model(**batch)


# ---------------------------------------------------------------------------------------------------------
# Image processor and processor


def reference_token_count(width: int, height: int, limit: int, patch: int = 14, kernel=(2, 2)) -> int:
    """The documented algorithm (as vLLM's Kimi-VL processing info computes it)."""
    if (width // patch) * (height // patch) > limit:
        scale = math.sqrt(limit / ((width // patch) * (height // patch)))
        width, height = int(width * scale), int(height * scale)
    pad_h = (kernel[0] * patch - height % (kernel[0] * patch)) % (kernel[0] * patch)
    pad_w = (kernel[1] * patch - width % (kernel[1] * patch)) % (kernel[1] * patch)
    return (height + pad_h) // (kernel[0] * patch) * ((width + pad_w) // (kernel[1] * patch))


@pytest.mark.parametrize(("size", "limit"), [((64, 48), 4096), ((28, 28), 4096), ((29, 27), 4096),
                                             ((1000, 700), 4096), ((2000, 1500), 4096), ((240, 160), 64),
                                             ((500, 90), 64), ((13, 40), 4096)])
def test_image_token_counts_follow_the_official_algorithm(loaded, size, limit):
    _, processor = loaded
    ip = copy.deepcopy(processor.image_processor)
    ip.in_token_limit = limit
    out = ip(PIL.Image.new("RGB", size, "white"))
    (h, w), = out["image_grid_hws"].tolist()
    assert h * w // 4 == reference_token_count(*size, limit) == ip.num_image_tokens(*size)
    assert out["pixel_values"].shape == (h * w, 3, 14, 14) and h % 2 == 0 and w % 2 == 0


def test_documented_resize_example(loaded):
    """240 x 160 px is 17 x 11 patches; under a limit of 64 it becomes 140 x 93 px, padded to 140 x 112 (10 x 8)."""
    _, processor = loaded
    ip = copy.deepcopy(processor.image_processor)
    ip.in_token_limit = 64
    assert ip.output_size(240, 160) == (140, 93)
    assert ip(picture((240, 160)))["image_grid_hws"].tolist() == [[8, 10]]


def test_pixels_are_the_normalised_image_padded_with_black_in_raster_patches(loaded):
    _, processor = loaded
    ip = processor.image_processor
    image = picture((50, 30), 7)
    out = ip(image)
    (h, w), = out["image_grid_hws"].tolist()
    assert (h, w) == (4, 4)  # 30 -> 56 rows, 50 -> 56 columns
    canvas = np.zeros((56, 56, 3), np.float32)
    canvas[:30, :50] = np.asarray(image, np.float32) / 255
    want = (torch.from_numpy(canvas) - 0.5) / 0.5  # mean = std = 0.5
    got = out["pixel_values"].view(h, w, 3, 14, 14).permute(0, 3, 1, 4, 2).reshape(56, 56, 3)
    torch.testing.assert_close(got, want)
    # Over the limit: bicubic resize (PIL) of the whole image to the truncated size, then the same padding.
    small = copy.deepcopy(ip)
    small.in_token_limit = 4
    got = small(image)["pixel_values"]
    resized = np.asarray(image.resize((int(50 * math.sqrt(4 / 6)), int(30 * math.sqrt(4 / 6))),
                                      PIL.Image.Resampling.BICUBIC), np.float32) / 255
    first_patch = (torch.from_numpy(resized[:14, :14]).permute(2, 0, 1) - 0.5) / 0.5
    torch.testing.assert_close(got[0], first_patch)


def test_too_large_an_image_is_refused_with_the_fix(loaded):
    _, processor = loaded
    ip = copy.deepcopy(processor.image_processor)
    ip.in_token_limit = 10**6
    with pytest.raises(ValueError, match="exceeds MoonViT's 511 per side; lower in_token_limit"):
        ip(PIL.Image.new("RGB", (14 * 520, 28)))


def test_processor_expands_each_placeholder_to_its_image_tokens(loaded):
    _, processor = loaded
    text = "a<|media_pad|>b<|media_pad|>c"
    out = processor(text=[text], images=[picture((64, 48)), picture((112, 112))], return_tensors="pt")
    ids = out["input_ids"][0].tolist()
    assert ids.count(SPECIAL_IDS["<|media_pad|>"]) == 6 + 16
    first = ids.index(SPECIAL_IDS["<|media_pad|>"])
    assert ids[first:first + 6] == [SPECIAL_IDS["<|media_pad|>"]] * 6 and ids[first + 6] != ids[first]
    with pytest.raises(ValueError, match="1 <\\|media_pad\\|> placeholder\\(s\\) but 2 image"):
        processor(text=["<|media_pad|>"], images=[picture(), picture()])


def test_processor_kwargs_reach_the_image_processor(tiny):
    from vlmtune.model import load_processor

    processor = load_processor(ModelConfig(name_or_path=str(tiny), processor_kwargs={"in_token_limit": 256}))
    assert processor.image_processor.in_token_limit == 256


# ---------------------------------------------------------------------------------------------------------
# Chat format


def test_chat_template_renders_the_documented_format(loaded):
    _, processor = loaded
    img = {"type": "image", "image": picture()}
    conv = [{"role": "user", "content": [img, {"type": "text", "text": "Q1"}]},
            {"role": "assistant", "content": [{"type": "text", "text": "A1"}]},
            {"role": "user", "content": [{"type": "text", "text": "Q2"}, img]}]
    media = "<|media_start|>image<|media_content|><|media_pad|><|media_end|>"
    default_system = "<|im_system|>system<|im_middle|>You are a helpful assistant<|im_end|>"
    assert processor.apply_chat_template(conv, tokenize=False, add_generation_prompt=True) == (
        f"{default_system}<|im_user|>user<|im_middle|>{media}Q1<|im_end|>"
        "<|im_assistant|>assistant<|im_middle|>A1<|im_end|>"
        f"<|im_user|>user<|im_middle|>Q2{media}<|im_end|><|im_assistant|>assistant<|im_middle|>")
    system = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    assert processor.apply_chat_template(system, tokenize=False) == \
        "<|im_system|>system<|im_middle|>Be brief.<|im_end|><|im_user|>user<|im_middle|>Hi<|im_end|>"


def test_thinking_answers_are_trained_in_full(loaded):
    """The Thinking models answer `◁think▷reasoning◁/think▷answer`: all of it is the answer, trained."""
    _, processor = loaded
    answers = ["◁think▷A red block, so red.◁/think▷Red.", "◁think▷Count.◁/think▷Two."]
    conv = [{"role": "user", "content": [{"type": "image", "image": picture()}, {"type": "text", "text": "Colour?"}]},
            {"role": "assistant", "content": [{"type": "text", "text": answers[0]}]},
            {"role": "user", "content": [{"type": "text", "text": "How many?"}]},
            {"role": "assistant", "content": [{"type": "text", "text": answers[1]}]}]
    enc = SampleEncoder(processor, FAMILY, max_length=4096)(conv, 0)
    ids, labels = enc.tensors["input_ids"].tolist(), enc.tensors["labels"].tolist()
    spans = [processor.tokenizer.decode(t) for t, trained in trained_runs(ids, labels) if trained]
    assert spans == [a + "<|im_end|>" for a in answers]


# ---------------------------------------------------------------------------------------------------------
# Tokenizer: the official tiktoken files, without remote code or the tiktoken package


def reference_tiktoken_encode(text: str, ranks: dict[bytes, int], specials: dict[str, int]) -> list[int]:
    """tiktoken's algorithm: special tokens as is; the rest split by Kimi's pattern, each piece its own rank if it
    has one, else its bytes merged pairwise, lowest-ranked merge first."""
    from vlmtune.models.kimi_vl.tokenization import PAT_STR

    pattern = regex.compile(PAT_STR, flags=regex.V1)  # V1: `&&` is class intersection, as in tiktoken's regex
    ids: list[int] = []
    for chunk in regex.split("(" + "|".join(map(regex.escape, specials)) + ")", text):
        if chunk in specials:
            ids.append(specials[chunk])
            continue
        for piece in pattern.findall(chunk):
            data = piece.encode()
            if data in ranks:
                ids.append(ranks[data])
                continue
            parts = [bytes([b]) for b in data]
            while len(parts) > 1:
                merges = [(ranks.get(parts[i] + parts[i + 1], math.inf), i) for i in range(len(parts) - 1)]
                best, i = min(merges)
                if best == math.inf:
                    break
                parts[i:i + 2] = [parts[i] + parts[i + 1]]
            ids.extend(ranks[p] for p in parts)
    return ids


TEXTS = ["Hello World! It's 2024-05-01, total: 12.50 EUR.\n\nThank you.",
         "你好，世界。图像中有一个红色的正方形。abc你好DEF",
         "<|im_user|>user<|im_middle|>What do you see?<|im_end|><|im_assistant|>assistant<|im_middle|>",
         "   spaces\tand\ttabs\r\n  ", "ÀÉÎõü naïve café — “quotes” 😀 👍🏽", "◁think▷x◁/think▷y",
         "12345678 don't WE'LL"]


def test_tokenizer_matches_a_reference_tiktoken_encoder(loaded, tiny):
    from vlmtune.models.kimi_vl.tokenization import read_tiktoken_ranks

    _, processor = loaded
    tok = processor.tokenizer
    ranks = read_tiktoken_ranks(tiny / "tiktoken.model")
    specials = {t.content: i for i, t in tok.added_tokens_decoder.items()}
    assert len(tok) == 163840 and len(ranks) == 163584 and len(specials) == 256
    assert {t: specials[t] for t in SPECIAL_IDS} == SPECIAL_IDS
    for text in TEXTS:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert ids == reference_tiktoken_encode(text, ranks, specials), text
        assert tok.decode(ids) == text


def test_official_tokenizer_files_without_tokenizer_json(loaded, tiny, tmp_path):
    """A download has tiktoken.model + tokenizer_config.json only: the same ids as the saved tokenizer.json, the
    special tokens named from added_tokens_decoder (the others reserved)."""
    from transformers import AutoProcessor

    for name in ("tiktoken.model", "config.json", "preprocessor_config.json", "chat_template.jinja"):
        shutil.copyfile(tiny / name, tmp_path / name)
    shutil.copyfile(KIMI_VL / "tokenizer_config.json", tmp_path / "tokenizer_config.json")
    processor = AutoProcessor.from_pretrained(tmp_path)
    _, saved = loaded
    for text in TEXTS:
        assert processor.tokenizer(text)["input_ids"] == saved.tokenizer(text)["input_ids"], text
    assert processor.tokenizer.convert_ids_to_tokens(163600) == "<|reserved_token_163600|>"
    assert processor.tokenizer.eos_token_id == SPECIAL_IDS["[EOS]"]


def test_a_malformed_tiktoken_file_says_where(tmp_path):
    from vlmtune.models.kimi_vl.tokenization import read_tiktoken_ranks

    (tmp_path / "tiktoken.model").write_text(f"{base64.b64encode(b'a').decode()} 0\nnot-a-line\n")
    with pytest.raises(ValueError, match=r"tiktoken.model:2 is not a tiktoken vocabulary line"):
        read_tiktoken_ranks(tmp_path / "tiktoken.model")


# ---------------------------------------------------------------------------------------------------------
# LoRA on the MoE experts


def lora_batch(processor):
    conv = [{"role": "user", "content": [{"type": "image", "image": picture()}, {"type": "text", "text": "Colour?"}]},
            {"role": "assistant", "content": [{"type": "text", "text": "Red, with a blue border and noise."}]}]
    enc = SampleEncoder(processor, FAMILY, max_length=4096)(conv, 0)
    return {k: v[None] if k in enc.seq_keys else v for k, v in enc.tensors.items()}


def test_lora_adapts_the_fused_experts_without_dropout(loaded, tiny):
    from vlmtune.errors import AdapterError
    from vlmtune.loss import loss_sum
    from vlmtune.peft import apply_lora, expert_parameter_targets, lora_targets

    model, processor = loaded
    experts = [n for n, p in model.named_parameters() if p.dim() == 3 and ".mlp.experts." in n]
    assert experts == ["language_model.model.layers.1.mlp.experts.gate_up_proj",
                       "language_model.model.layers.1.mlp.experts.down_proj"]
    pcfg = PeftConfig(method="lora", dropout=0.0, r=2)
    assert expert_parameter_targets(model, FAMILY, pcfg, FreezeConfig()) == experts
    assert expert_parameter_targets(model, FAMILY, pcfg, FreezeConfig(language_model=True)) == []
    assert expert_parameter_targets(model, FAMILY, PeftConfig(method="lora", dropout=0.0, target_modules=["q_proj"]),
                                    FreezeConfig()) == []
    only_experts = PeftConfig(method="lora", dropout=0.0, target_modules=["experts"], r=2)
    assert expert_parameter_targets(model, FAMILY, only_experts, FreezeConfig()) == experts
    assert lora_targets(model, FAMILY, only_experts, FreezeConfig()) == []
    adapters_only_on_experts, _ = apply_lora(copy.deepcopy(model), FAMILY, only_experts, FreezeConfig(), str(tiny))
    assert {n.split(".lora_")[0] for n, _ in adapters_only_on_experts.named_parameters() if ".lora_" in n} == \
        {"base_model.model.language_model.model.layers.1.mlp.experts",
         "base_model.model.language_model.model.layers.1.mlp.experts.base_layer"}
    with pytest.raises(AdapterError, match="chose only fused MoE experts"), pytest.warns(UserWarning):
        apply_lora(copy.deepcopy(model), FAMILY, PeftConfig(method="lora", dropout=0.05, target_modules=["experts"]),
                   FreezeConfig(), str(tiny))
    peft_model, _ = apply_lora(copy.deepcopy(model), FAMILY, pcfg, FreezeConfig(), str(tiny))
    factors = {n: p for n, p in peft_model.named_parameters() if ".mlp.experts." in n and ".lora_" in n}
    assert len(factors) == 4 and all(p.requires_grad for p in factors.values())
    with torch.no_grad():  # lora_B starts at zero: make the adapters matter
        for n, p in factors.items():
            if ".lora_B." in n:
                p.normal_(std=0.1)
    batch = lora_batch(processor)
    loss_sum(peft_model, batch, None).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in factors.values())
    base = {k: v for k, v in batch.items() if k != "labels"}
    peft_model.eval()
    with torch.no_grad():
        adapted = peft_model(**base).logits
        merged = peft_model.merge_and_unload()(**base).logits
        plain = model(**base).logits
    torch.testing.assert_close(merged, adapted, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(adapted, plain, atol=1e-4)  # the expert adapters changed the output


def test_expert_adapters_need_no_dropout_and_say_so(loaded):
    from vlmtune.peft import expert_parameter_targets

    model, _ = loaded
    for pcfg in (PeftConfig(method="lora", dropout=0.05), PeftConfig(method="dora", dropout=0.0)):
        with pytest.warns(UserWarning, match="set peft.dropout=0 to adapt them"):
            assert expert_parameter_targets(model, FAMILY, pcfg, FreezeConfig()) == []


def test_lora_run_with_expert_adapters_exports_merged_to_the_official_layout(tiny, loaded, tmp_path):
    """`vlmtune finetune` with LoRA (dropout 0): the adapter has the routed experts' factors; `vlmtune export --merge`
    writes the official per-expert names, and the merged folder computes what base + adapter computes."""
    import yaml
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText

    from vlmtune.cli import main

    picture().save(tmp_path / "a.png")
    rows = [{"messages": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": f"Colour {i}?"}]},
                          {"role": "assistant", "content": [{"type": "text", "text": f"Red number {i}."}]}],
             "images": ["a.png"]} for i in range(3)]
    (tmp_path / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "r.yaml").write_text(yaml.safe_dump({
        "output_dir": str(tmp_path / "out"), "model": {"name_or_path": str(tiny)},
        "data": {"train": {"source": str(tmp_path / "data.jsonl")}},
        "train": {"max_steps": 2, "micro_batch_size": 3, "global_batch_size": 3, "lr": 1e-2, "max_length": 512},
        "peft": {"method": "lora", "r": 2, "dropout": 0.0}}))
    assert main(["finetune", "-c", str(tmp_path / "r.yaml")]) == 0
    adapter = load_file(tmp_path / "out" / "final" / "adapter_model.safetensors")
    expert_factors = [k for k in adapter if ".mlp.experts." in k]
    assert len(expert_factors) == 4 and any(adapter[k].abs().sum() > 0 for k in expert_factors if "lora_B" in k)
    assert main(["export", "--checkpoint", str(tmp_path / "out" / "final"), "--out", str(tmp_path / "hf"),
                 "--merge"]) == 0
    merged_weights = load_file(tmp_path / "hf" / "model.safetensors")
    assert {k: tuple(v.shape) for k, v in merged_weights.items()} == \
        official_weight_shapes(json.loads((tmp_path / "hf" / "config.json").read_text()))
    base, processor = loaded
    adapted = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "out" / "final").eval()
    merged = AutoModelForImageTextToText.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    batch = processor(text=["<|media_pad|>Colour?"], images=[picture()], return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(merged(**batch).logits, adapted(**batch).logits, atol=1e-5, rtol=1e-5)
        assert not torch.allclose(merged(**batch).logits, base(**batch).logits, atol=1e-4)


def test_activation_checkpointing_covers_decoder_layers_and_vision_blocks(loaded):
    """Every DeepSeek-V3 decoder layer and MoonViT block is a checkpointable layer (FSDP2 units and
    distributed.activation_checkpointing rely on it); recomputing changes no gradient."""
    from vlmtune.loss import loss_sum
    from vlmtune.parallel import apply_activation_checkpointing

    base, processor = loaded
    batch = lora_batch(processor)

    def grads(model):
        model.train().zero_grad()
        loss_sum(model, batch, None).backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    model = copy.deepcopy(base)
    want = grads(model)
    assert apply_activation_checkpointing(model, FAMILY, "language") == 2
    assert apply_activation_checkpointing(model, FAMILY, "vision") == 2
    got = grads(model)
    assert got.keys() == want.keys() and len(got) == len(list(model.parameters()))
    for name, g in want.items():
        torch.testing.assert_close(got[name], g, atol=1e-6, rtol=1e-5, msg=name)
