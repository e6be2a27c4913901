"""Nemotron-Parse, native (vlmtune/models/nemotron_parse): weights and files in the official layout, the processor's
geometry and pixels, the tokenizer's ids, the output syntax, and the model against independent references.

References used: the official weight list (tests/assets/nemotron-parse/weight_keys.txt, from the official module
structure), OpenCV's own resize outputs (tests/assets/nemotron-parse/resize), a page decoded by the real model with
the official postprocessing's boxes (RESULT_* below, from result.json of the source repo), ids read from the real
tokenizer_config.json, NVIDIA's RADIO forward rewritten here with timm's ViT blocks, and transformers' MBartDecoder.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vlmtune.models.nemotron_parse import register, syntax
from vlmtune.models.nemotron_parse.configuration import NemotronParseConfig, NemotronParseConfigError, radio_config
from vlmtune.models.nemotron_parse.modeling import NemotronParseForConditionalGeneration
from vlmtune.models.nemotron_parse.processing import NemotronParseImageProcessor

ASSET = Path(__file__).parent / "assets" / "nemotron-parse"
OFFICIAL_FILES = ("config.json", "generation_config.json", "preprocessor_config.json", "processor_config.json",
                  "special_tokens_map.json")


def official(name: str) -> dict:
    return json.loads((ASSET / name).read_text())


def official_keys() -> dict[str, tuple[int, ...]]:
    rows = (line.split("\t") for line in (ASSET / "weight_keys.txt").read_text().splitlines())
    return {name: tuple(int(s) for s in shape.split(",")) for name, shape in rows}


@pytest.fixture(scope="module")
def tiny_dir(tiny_model) -> Path:
    return tiny_model("nemotron_parse")


@pytest.fixture(scope="module")
def loaded(tiny_dir):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    register()
    model = AutoModelForImageTextToText.from_pretrained(tiny_dir).eval()
    return model, AutoProcessor.from_pretrained(tiny_dir)


def pages(processor, *sizes):
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for w, h in sizes]
    return processor(images=images)["pixel_values"]


def prompt_and(processor, text: str) -> list[int]:
    return processor.tokenizer(syntax.PROMPT + text, add_special_tokens=False).input_ids


# ---------------------------------------------------------------------------------------------------------------
# Weights and files in the official layout


def test_full_size_model_has_the_official_weight_names_and_shapes():
    """Built on the meta device from the official config.json; saved names (transformers' radio conversion reverted,
    as save_pretrained does) and shapes equal the official list, and the parameters add up to the measured size of
    the checkpoint file (3,745,103,920 data bytes: 666 float32 tensors and summary_idxs in int64)."""
    from transformers.core_model_loading import revert_weight_conversion

    with torch.device("meta"):
        model = NemotronParseForConditionalGeneration(NemotronParseConfig(**official("config.json")))
    saved = revert_weight_conversion(model, dict(model.state_dict()))
    assert {k: tuple(v.shape) for k, v in saved.items()} == official_keys()
    assert sum(v.numel() * (8 if v.dtype == torch.int64 else 4) for v in saved.values()) == 3_745_103_920
    assert not [n for n in model.state_dict() if "layer_scale" in n]


def _official_shape(shape: tuple[int, ...], dims: dict[int, int]) -> tuple[int, ...]:
    return tuple(dims.get(s, s) for s in shape)


def test_checkpoint_with_the_official_names_loads_without_missing_or_unexpected_keys(tmp_path):
    """The official depth (32 RADIO blocks, 10 decoder layers) at small widths: a checkpoint written under the official
    names loads with nothing missing, unexpected or mismatched; fused qkv is split q, k, v; saving writes it back."""
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForImageTextToText

    register()
    width, radio = 12, 24  # official 1024 and 1280 (and their multiples) scaled down
    dims = {1024: width, 4096: 4 * width, 1280: radio, 3840: 3 * radio, 5120: 4 * radio}
    cfg = official("config.json")
    cfg["encoder"].update(hidden_size=radio, num_attention_heads=2)
    cfg["decoder"].update(d_model=width, hidden_size=width, decoder_attention_heads=2, decoder_ffn_dim=4 * width)
    gen = torch.Generator().manual_seed(0)
    state = {}
    for name, shape in official_keys().items():
        shape = _official_shape(shape, dims)
        state[name] = (torch.tensor([0, 1, 2]) if name.endswith("summary_idxs")
                       else torch.randn(shape, generator=gen))
    (tmp_path / "in").mkdir()
    save_file(state, str(tmp_path / "in" / "model.safetensors"), metadata={"format": "pt"})
    (tmp_path / "in" / "config.json").write_text(json.dumps(cfg))

    model, info = AutoModelForImageTextToText.from_pretrained(tmp_path / "in", output_loading_info=True,
                                                              dtype=torch.float32)
    assert (info["missing_keys"], info["unexpected_keys"], info["mismatched_keys"]) == (set(), set(), set())
    qkv = state["encoder.model_encoder.radio_model.model.blocks.7.attn.qkv.weight"]
    attention = model.encoder.model_encoder.encoder.layer[7].attention
    for i, proj in enumerate((attention.q_proj, attention.k_proj, attention.v_proj)):
        assert torch.equal(proj.weight, qkv[i * radio:(i + 1) * radio])
    assert torch.equal(model.decoder.layers[9].encoder_attn.k_proj.weight,
                       state["decoder.layers.9.encoder_attn.k_proj.weight"])

    model.save_pretrained(tmp_path / "out")
    saved = load_file(str(tmp_path / "out" / "model.safetensors"))
    assert set(saved) == set(state)
    assert all(torch.equal(saved[k], state[k]) for k in state)


def test_saved_model_and_processor_keep_the_official_layout(tiny_dir, loaded, tmp_path):
    from safetensors import safe_open

    model, processor = loaded
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    expected = {k for k in official_keys()
                if not (".blocks." in k and int(k.split(".blocks.")[1].split(".")[0]) >= 2)
                and not (k.startswith("decoder.layers.") and int(k.split(".")[2]) >= 2)}
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        assert set(f.keys()) == expected

    saved = json.loads((tmp_path / "config.json").read_text())
    source = json.loads((tiny_dir / "config.json").read_text())
    real = official("config.json")
    assert saved["architectures"] == ["NemotronParseForConditionalGeneration"]
    assert saved["model_type"] == "nemotron_parse" and saved["auto_map"] == real["auto_map"]
    assert saved["encoder"] == source["encoder"]  # the remote RADIO config, verbatim
    # transformers 5 writes dtype for torch_dtype, keeps generation settings in generation_config.json only, and
    # leaves out values equal to the defaults: every other official entry reads back with its value.
    assert set(real) - set(saved) == {"torch_dtype"}
    again = NemotronParseConfig.from_pretrained(tmp_path)
    for key, value in source["decoder"].items():
        if key not in GENERATION_KEYS | {"torch_dtype", "_attn_implementation", "id2label", "label2id"}:
            assert getattr(again.decoder, key) == value, key
    assert {str(k): v for k, v in again.decoder.id2label.items()} == source["decoder"]["id2label"]

    pre = json.loads((tmp_path / "preprocessor_config.json").read_text())
    assert set(pre) == set(official("preprocessor_config.json"))
    assert json.loads((tmp_path / "processor_config.json").read_text()) == official("processor_config.json")
    tok = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert tok["tokenizer_class"] == "PreTrainedTokenizerFast" and tok["processor_class"] == "NemotronParseProcessor"


GENERATION_KEYS = {"max_length", "min_length", "num_beams", "do_sample", "temperature", "top_k", "top_p", "typical_p",
                   "repetition_penalty", "length_penalty", "no_repeat_ngram_size", "early_stopping",
                   "num_return_sequences", "output_scores", "return_dict_in_generate", "bad_words_ids",
                   "forced_bos_token_id", "remove_invalid_values", "exponential_decay_length_penalty",
                   "suppress_tokens", "begin_suppress_tokens", "encoder_no_repeat_ngram_size", "diversity_penalty",
                   "num_beam_groups"}


def test_reloaded_model_gives_the_same_logits(loaded, tmp_path):
    from transformers import AutoModelForImageTextToText

    model, processor = loaded
    model.save_pretrained(tmp_path)
    again = AutoModelForImageTextToText.from_pretrained(tmp_path).eval()
    pixels = pages(processor, (150, 200))
    ids = torch.tensor([prompt_and(processor, "<x_0.1><y_0.2>Hello")])
    with torch.no_grad():
        assert torch.equal(model(pixel_values=pixels, decoder_input_ids=ids).logits,
                           again(pixel_values=pixels, decoder_input_ids=ids).logits)


def test_canvas_size_can_be_overridden_when_loading(tiny_dir, tmp_path):
    from transformers import AutoProcessor

    register()
    processor = AutoProcessor.from_pretrained(tiny_dir, final_size=[96, 88])
    assert processor(images=Image.new("RGB", (50, 50)))["pixel_values"].shape == (1, 3, 96, 88)
    processor.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "preprocessor_config.json").read_text())
    assert saved["final_size"] == [96, 88] and saved["size"] == {"height": 96, "width": 88, "longest_edge": [96, 88]}


def test_register_is_idempotent_and_every_auto_class_finds_the_native_classes(tiny_dir):
    from transformers import AutoConfig, AutoImageProcessor, AutoModel, AutoModelForImageTextToText, AutoProcessor

    from vlmtune.models import register_native_models
    from vlmtune.models.nemotron_parse.processing import NemotronParseProcessor

    register()
    register_native_models()
    register()
    config = AutoConfig.from_pretrained(tiny_dir)  # its auto_map names remote code; the local classes win
    assert type(config) is NemotronParseConfig
    assert AutoModel._model_mapping[NemotronParseConfig] is NemotronParseForConditionalGeneration
    assert AutoModelForImageTextToText._model_mapping[NemotronParseConfig] is NemotronParseForConditionalGeneration
    assert type(AutoImageProcessor.from_pretrained(tiny_dir)) is NemotronParseImageProcessor
    assert type(AutoProcessor.from_pretrained(tiny_dir)) is NemotronParseProcessor


def test_unsupported_encoder_settings_are_named():
    cfg = official("config.json")["encoder"]
    with pytest.raises(NemotronParseConfigError, match="vitdet_window_size"):
        radio_config({**cfg, "vitdet_window_size": 16})
    with pytest.raises(NemotronParseConfigError, match=r"vit_giant_patch14_224.*hidden_size"):
        radio_config({**cfg, "args": {**cfg["args"], "model": "vit_giant_patch14_224"}})
    radio = radio_config(cfg)  # C-RADIOv2-H: 4 teachers -> 4 class tokens + 4 registers; 3 teachers' summaries
    assert (radio.hidden_size, radio.num_hidden_layers, radio.num_attention_heads) == (1280, 32, 16)
    assert (radio.num_cls_tokens, radio.num_registers, radio.summary_idxs) == (4, 4, [0, 1, 2])


# ---------------------------------------------------------------------------------------------------------------
# Processor: geometry and pixels


def official_image_processor() -> NemotronParseImageProcessor:
    return NemotronParseImageProcessor.from_dict(official("preprocessor_config.json"))


@pytest.mark.parametrize(("size", "box"), [
    ((850, 1100), (474, 1574, 399, 1249)),   # fits: not resized, centred (2048-1100)/2, (1648-850)/2
    ((4000, 1000), (818, 1230, 0, 1648)),    # too wide: 1648 x int(1648 / 4) = 412 rows, top (2048-412)//2
    ((3000, 4000), (0, 2048, 56, 1592)),     # too tall: int(2048 * 0.75) = 1536 wide, left (1648-1536)//2
    ((1649, 2049), (0, 2048, 0, 1648)),      # 2049 -> 2048 rows, int(2048 * 1649 / 2049) = 1648 columns
])
def test_official_settings_place_the_page_on_a_white_2048_by_1648_canvas(size, box):
    processor = official_image_processor()
    assert processor.final_size == [2048, 1648] and processor.do_rescale and not processor.do_normalize
    pixels = processor(images=Image.new("RGB", size, (0, 0, 0)))["pixel_values"]
    top, bottom, left, right = box
    assert pixels.shape == (1, 3, 2048, 1648) and pixels.dtype == torch.float32
    inside = torch.zeros(2048, 1648, dtype=torch.bool)
    inside[top:bottom, left:right] = True
    assert torch.all(pixels[0][:, inside] == 0) and torch.all(pixels[0][:, ~inside] == 1)


@pytest.mark.parametrize("name", ["45x61_to_23x32", "40x64_to_20x32", "90x20_to_28x6"])
def test_resize_is_opencv_inter_linear_to_the_pixel(name):
    """Expected pixels written by cv2.resize(INTER_LINEAR) itself (opencv-python-headless 4.12.0.88); the 40 x 64
    page is an exact halving, where OpenCV switches to area averaging."""
    source, target = name.split("_to_")
    page = Image.open(ASSET / "resize" / f"page_{source}.png")
    expected = torch.from_numpy(np.array(Image.open(ASSET / "resize" / f"cv2_{name}.png"))).permute(2, 0, 1)
    processor = NemotronParseImageProcessor(final_size=(32, 28))
    pixels = processor(images=page)["pixel_values"][0]
    width, height = (int(v) for v in target.split("x"))
    left, top = (28 - width) // 2, (32 - height) // 2
    assert torch.equal(pixels[:, top:top + height, left:left + width], expected.float() / 255)
    pixels[:, top:top + height, left:left + width] = 1
    assert torch.all(pixels == 1)


def test_pixels_are_uint8_over_255_and_grey_or_rgba_pages_become_rgb():
    processor = NemotronParseImageProcessor(final_size=(8, 8))
    values = np.arange(64, dtype=np.uint8).reshape(8, 8) * 4
    grey = processor(images=[Image.fromarray(values, "L"), values])["pixel_values"]
    expected = torch.from_numpy(values).float() / 255
    assert torch.equal(grey[0], expected.expand(3, 8, 8)) and torch.equal(grey[1], grey[0])
    rgba = Image.new("RGBA", (8, 8), (10, 20, 30, 0))
    assert torch.equal(processor(images=rgba)["pixel_values"][0, :, 0, 0], torch.tensor([10, 20, 30]) / 255)


def test_image_processor_rejects_what_it_cannot_honour():
    with pytest.raises(ValueError, match="do_normalize"):
        NemotronParseImageProcessor(do_normalize=True)
    with pytest.raises(ValueError, match="needs height and width"):
        NemotronParseImageProcessor(size={"shortest_edge": 32})
    with pytest.raises(TypeError, match="PIL images or uint8 arrays"):
        NemotronParseImageProcessor()(images=np.zeros((4, 4, 3), dtype=np.float32))
    with pytest.raises(ValueError, match="too thin"):
        NemotronParseImageProcessor(final_size=(32, 28))(images=Image.new("RGB", (1, 100)))


# ---------------------------------------------------------------------------------------------------------------
# Tokenizer


# (id, token) pairs read from the real tokenizer_config.json (nvidia/NVIDIA-Nemotron-Parse-v1.1).
REAL_IDS = [(0, "<s>"), (1, "<pad>"), (2, "</s>"), (3, "<unk>"), (22, "[END_I_SMILES]"), (50000, "<output_plain>"),
            (50001, "<output_markdown>"), (50002, "<output_no_text>"), (50004, "<predict_bbox>"),
            (50008, "<predict_classes>"), (50009, "<x_0.0>"), (50010, "<x_0.001>"), (50012, "<x_0.0029>"),
            (50050, "<x_0.04>"), (50054, "<x_0.0439>"), (51031, "<x_0.998>"), (51032, "<x_0.999>"),
            (51033, "<y_0.0>"), (51034, "<y_0.0008>"), (51041, "<y_0.0063>"), (51042, "<y_0.007>"),
            (51097, "<y_0.05>"), (52057, "<y_0.8>"), (52312, "<y_0.9992>"), (52313, "<class_Text>"),
            (52315, "<class_Section-header>"), (52325, "<class_Table>"), (52326, "<class_Caption>")]


def test_tokenizer_has_the_real_special_task_coordinate_and_class_ids(loaded):
    _, processor = loaded
    tok = processor.tokenizer
    assert len(tok) == 52327 == syntax.VOCAB_SIZE
    assert [tok.convert_ids_to_tokens(i) for i, _ in REAL_IDS] == [t for _, t in REAL_IDS]
    assert (tok.bos_token_id, tok.pad_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2, 3)
    assert tok(syntax.PROMPT, add_special_tokens=False).input_ids == [2, 0, 50004, 50008, 50001]
    ids = syntax.token_ids(tok)
    assert ids["coordinate"] == list(range(50009, 52313)) and ids["class"] == list(range(52313, 52327))
    assert ids["structure"] == list(range(50000, 52327))


def test_tokenizer_round_trips_a_real_decoded_page(loaded):
    """The decoded output of the real model (skip_special_tokens=True) tokenises into coordinate and class tokens and
    decodes back to itself; the post-processor adds <s> ... </s>, as the real tokenizer.json does."""
    _, processor = loaded
    tok = processor.tokenizer
    ids = tok(RESULT_RAW, add_special_tokens=False).input_ids
    assert tok.decode(ids) == RESULT_RAW
    assert [i for i in ids if i >= 50009] == [tok.convert_tokens_to_ids(t) for t in
                                              ("<x_0.3779>", "<y_0.3094>", "<x_0.624>", "<y_0.3297>",
                                               "<class_Title>", "<x_0.3564>", "<y_0.3461>", "<x_0.6445>",
                                               "<y_0.3617>", "<class_Text>")]
    with_specials = tok(RESULT_RAW).input_ids
    assert with_specials[0] == 0 and with_specials[-1] == 2 and with_specials[1:-1] == ids
    prompt = tok(syntax.PROMPT + RESULT_RAW, add_special_tokens=False).input_ids
    assert tok.decode(prompt, skip_special_tokens=True) == RESULT_RAW


# ---------------------------------------------------------------------------------------------------------------
# Output syntax

# The first two blocks of page 1 of result.json (jiyang0315/nemotron-parse-flask-service): the real model's decoded
# output for an 850 x 1100 page, and the boxes the official postprocessing (transform_bbox_to_original) made of it.
RESULT_RAW = ("<x_0.3779><y_0.3094># DiffBIR: Toward Blind Image Restoration with Generative Diffusion Prior"
              "<x_0.624><y_0.3297><class_Title>\n\n<x_0.3564><y_0.3461>Xinqi Lin<sup>1,2;∗</sup>, Jingwen He"
              "<sup>3,4;∗</sup><x_0.6445><y_0.3617><class_Text>")
RESULT_PAGE = (850, 1100)
RESULT_BLOCKS = [
    {"bbox": [223.7792000000001, 159.65120000000002, 629.3520000000001, 201.2256], "class": "Title",
     "text": "# DiffBIR: Toward Blind Image Restoration with Generative Diffusion Prior"},
    {"bbox": [188.34720000000002, 234.81280000000004, 663.136, 266.76160000000004], "class": "Text",
     "text": "Xinqi Lin<sup>1,2;∗</sup>, Jingwen He<sup>3,4;∗</sup>"},
]


def test_parse_recovers_the_official_postprocessing_of_a_real_page():
    blocks = syntax.parse_page(RESULT_RAW, RESULT_PAGE)
    assert [(b["class"], b["text"]) for b in blocks] == [(b["class"], b["text"]) for b in RESULT_BLOCKS]
    for got, want in zip(blocks, RESULT_BLOCKS, strict=True):
        assert got["bbox"] == pytest.approx(want["bbox"], abs=1e-9)


def test_render_writes_the_real_models_syntax():
    assert syntax.render_page(RESULT_BLOCKS, RESULT_PAGE) == RESULT_RAW


def test_coordinate_tokens_are_the_real_values_in_id_order():
    tokens = syntax.coordinate_tokens()
    assert len(tokens) == len(set(tokens)) == 2304
    assert tokens[0] == "<x_0.0>" and tokens[1023] == "<x_0.999>" and tokens[1024] == "<y_0.0>"
    assert tokens[-1] == "<y_0.9992>" and syntax.added_tokens()[9 + 41] == "<x_0.04>"


@pytest.mark.parametrize("page", [(850, 1100), (2550, 3300), (4000, 1000), (1648, 2048)])
def test_render_then_parse_round_trips_within_half_a_step(page):
    rng = np.random.default_rng(1)
    width, height = page
    blocks = []
    for i in range(20):  # away from the far edges, where 1.0 is clipped to the last step
        x0, x1 = sorted(rng.uniform(0, 0.99 * width, 2))
        y0, y1 = sorted(rng.uniform(0, 0.99 * height, 2))
        blocks.append({"bbox": [x0, y0, x1, y1], "class": syntax.CLASSES[i % 14], "text": f"line {i}\n* item"})
    text = syntax.render_page(blocks, page)
    parsed = syntax.parse_page(text, page)
    new_width, new_height = syntax.resized_size(width, height)
    # half a token step, plus the token's 4-decimal rounding, in page pixels
    step_x = (0.5 / 1024 + 0.5e-4) * 1648 * width / new_width + 1e-9
    step_y = (0.5 / 1280 + 0.5e-4) * 2048 * height / new_height + 1e-9
    for got, want in zip(parsed, blocks, strict=True):
        assert (got["class"], got["text"]) == (want["class"], want["text"])
        assert all(abs(g - w) <= s for g, w, s in zip(got["bbox"], want["bbox"], (step_x, step_y) * 2, strict=True))
    assert syntax.render_page(parsed, page) == text  # quantised boxes render to the same tokens
    normalized = [{**b, "bbox": [b["bbox"][0] / width, b["bbox"][1] / height, b["bbox"][2] / width,
                                 b["bbox"][3] / height]} for b in blocks]
    assert syntax.render_page(normalized, page, units="normalized") == text


def test_parse_is_tolerant_of_malformed_output():
    parse = syntax.parse_page
    assert parse("") == [] and parse("</s>") == []
    assert parse("<s><predict_bbox>Hello</s>") == [{"bbox": None, "class": None, "text": "Hello"}]
    cut = parse("<x_0.1><y_0.2>Title<x_0.3><y_0.4><class_Title>\n\n<x_0.5><y_0.5>never fini")
    assert cut == [{"bbox": [0.1, 0.2, 0.3, 0.4], "class": "Title", "text": "Title"},
                   {"bbox": None, "class": None, "text": "never fini"}]
    no_class = parse("<x_0.1><y_0.2>a<x_0.3><y_0.4>\n\n<x_0.5><y_0.5>b<x_0.6><y_0.6><class_Text>")
    assert [(b["text"], b["class"]) for b in no_class] == [("a", None), ("b", "Text")]
    assert parse("<x_0.1><y_0.2>a<x_0.3><y_0.4><class_Unknown-kind>")[0]["class"] == "Unknown-kind"
    assert parse("<x_1.5><y_-0><x_0.7>a<y_0.2>")[0]["bbox"] is None  # a stray x, no second corner
    clipped = parse("<x_1.5><y_0.2>a<x_2.0><y_0.4><class_Text>")[0]["bbox"]
    assert clipped == [1.0, 0.2, 1.0, 0.4]
    assert parse("loose text <y_0.3> more") == [{"bbox": None, "class": None, "text": "loose text  more"}]


def test_render_rejects_bad_blocks_with_the_reason():
    page = (100, 100)
    good = {"bbox": [1, 2, 3, 4], "class": "Text", "text": "a"}
    with pytest.raises(ValueError, match="unknown class 'Paragraph'"):
        syntax.render_page([{**good, "class": "Paragraph"}], page)
    with pytest.raises(ValueError, match=r"block 1 lacks \['text'\]"):
        syntax.render_page([good, {"bbox": [1, 2, 3, 4], "class": "Text"}], page)
    with pytest.raises(ValueError, match="x1 < x0"):
        syntax.render_page([{**good, "bbox": [5, 2, 3, 4]}], page)
    with pytest.raises(ValueError, match="image_size"):
        syntax.render_page([good])
    with pytest.raises(ValueError, match="coordinate, class or special token"):
        syntax.render_page([{**good, "text": "see <x_0.5>"}], page)
    assert syntax.render_page([{**good, "bbox": [0.5, 0.25, 1.0, 0.5]}], units="normalized").startswith(
        "<x_0.5><y_0.25>a<x_0.999><y_0.5>")  # canvas fractions as given; 1.0 has no token: the last step


def test_teacher_forcing_trains_the_target_and_the_end_token_only(loaded):
    model, processor = loaded
    tok = processor.tokenizer
    inputs, labels = syntax.teacher_forcing(tok, RESULT_RAW)
    assert inputs[:5] == [2, 0, 50004, 50008, 50001] and len(inputs) == len(labels)
    assert labels[:4] == [-100] * 4 and labels[-1] == 2 and -100 not in labels[4:]
    assert tok.decode([t for t in labels if t != -100]) == RESULT_RAW + "</s>"
    assert labels[:-1][4:] == inputs[5:]  # each label is the next input token
    # The official convention: decoder input = labels shifted right behind the start token, prompt included.
    with_prompt = [0, 50004, 50008, 50001, *labels[4:]]
    assert [2, *with_prompt[:-1]] == inputs
    pixels = pages(processor, (150, 200))
    with torch.no_grad():
        loss = model(pixel_values=pixels, decoder_input_ids=torch.tensor([inputs]),
                     labels=torch.tensor([labels])).loss
        logits = model(pixel_values=pixels, decoder_input_ids=torch.tensor([inputs])).logits[0].double()
    trained = [(t, y) for t, y in enumerate(labels) if y != -100]
    expected = sum(-torch.log_softmax(logits[t], -1)[y] for t, y in trained) / len(trained)
    assert loss.item() == pytest.approx(float(expected), rel=1e-6)
    with pytest.raises(ValueError, match="decoder start token"):
        syntax.teacher_forcing(tok, "x", prompt="<s><predict_bbox>")


def test_prompts():
    assert syntax.PROMPT == "</s><s><predict_bbox><predict_classes><output_markdown>"
    assert syntax.PROMPT_NO_TEXT.endswith("<output_no_text>")


# ---------------------------------------------------------------------------------------------------------------
# The model


def test_logits_to_keep_gives_the_full_logits_at_those_positions(loaded):
    model, processor = loaded
    pixels = pages(processor, (150, 200), (300, 120))
    ids = torch.tensor([prompt_and(processor, "<x_0.1><y_0.2>Hello there<x_0.3><y_0.4><class_Text>")] * 2)
    with torch.no_grad():
        full = model(pixel_values=pixels, decoder_input_ids=ids, use_cache=False).logits
        assert torch.equal(model(pixel_values=pixels, decoder_input_ids=ids, logits_to_keep=0).logits, full)
        last = model(pixel_values=pixels, decoder_input_ids=ids, logits_to_keep=3).logits
        positions = torch.tensor([0, 4, 7])
        picked = model(pixel_values=pixels, decoder_input_ids=ids, logits_to_keep=positions).logits
    assert full.shape == (2, ids.shape[1], 52352)
    torch.testing.assert_close(last, full[:, -3:], rtol=0, atol=1e-6)
    torch.testing.assert_close(picked, full[:, positions], rtol=0, atol=1e-6)
    assert model.get_output_embeddings() is model.lm_head and type(model.lm_head) is torch.nn.Linear


def test_teacher_forced_loss_is_the_mean_cross_entropy_of_the_trained_tokens(loaded):
    model, processor = loaded
    pixels = pages(processor, (150, 200), (300, 120))
    target = processor.tokenizer("<x_0.1><y_0.2>Hi<x_0.3><y_0.4><class_Text>", add_special_tokens=False).input_ids
    prompt = processor.tokenizer(syntax.PROMPT, add_special_tokens=False).input_ids
    ids = torch.tensor([prompt + target, prompt + target[:-2] + [1, 1]])
    mask = torch.tensor([[1] * ids.shape[1], [1] * (ids.shape[1] - 2) + [0, 0]])
    labels = torch.cat([ids[:, 1:], torch.full((2, 1), 2)], dim=1)  # next token, then </s>
    labels[:, :len(prompt) - 1] = -100  # the prompt is never trained
    labels[1, -3:] = -100  # the second row: padding
    with torch.no_grad():
        out = model(pixel_values=pixels, decoder_input_ids=ids, decoder_attention_mask=mask, labels=labels)
        logits = model(pixel_values=pixels, decoder_input_ids=ids, decoder_attention_mask=mask).logits.double()
    terms = [-torch.log_softmax(logits[b, t], -1)[labels[b, t]]
             for b in range(2) for t in range(ids.shape[1]) if labels[b, t] != -100]
    assert out.loss.item() == pytest.approx(float(sum(terms) / len(terms)), rel=1e-6)
    kept = model(pixel_values=pixels, decoder_input_ids=ids, decoder_attention_mask=mask, labels=labels,
                 logits_to_keep=4).loss
    last = [-torch.log_softmax(logits[b, t], -1)[labels[b, t]]
            for b in range(2) for t in range(ids.shape[1] - 4, ids.shape[1]) if labels[b, t] != -100]
    assert kept.item() == pytest.approx(float(sum(last) / len(last)), rel=1e-6)
    # Without decoder_input_ids the labels are shifted right behind decoder_start (2), -100 read as <pad>.
    shifted = torch.cat([torch.full((2, 1), 2), labels[:, :-1].clamp(min=1)], dim=1)
    with torch.no_grad():
        auto = model(pixel_values=pixels, labels=labels).logits
        explicit = model(pixel_values=pixels, decoder_input_ids=shifted).logits
    torch.testing.assert_close(auto, explicit, rtol=0, atol=0)


def _radio_reference(state: dict, pixels: torch.Tensor, config) -> tuple[torch.Tensor, torch.Tensor]:
    """NVIDIA's RADIO forward (radio/radio_model.py, vit_patch_generator.py, enable_cpe_support.py, eval mode), with
    timm's ViT blocks, from the weights under their official names."""
    from functools import partial

    from timm.models.vision_transformer import Block

    get = lambda name: state[f"encoder.model_encoder.radio_model.{name}"]  # noqa: E731
    x = (pixels - get("input_conditioner.norm_mean")) / get("input_conditioner.norm_std")
    patch, hidden = config.patch_size, config.hidden_size
    batch, _, height, width = x.shape
    rows, cols = height // patch, width // patch
    patches = x.reshape(batch, 3, rows, patch, cols, patch).permute(0, 2, 4, 1, 3, 5).reshape(batch, rows * cols, -1)
    tokens = patches @ get("model.patch_generator.embedder.weight").T
    side = math.isqrt(get("model.patch_generator.pos_embed").shape[1])
    pos = get("model.patch_generator.pos_embed").reshape(1, side, side, hidden).permute(0, 3, 1, 2)
    if (rows, cols) != (side, side):  # CPE at inference: scale to the longer side, crop the rest
        longest = max(rows, cols)
        pos = torch.nn.functional.interpolate(pos, size=(longest, longest), mode="bilinear", align_corners=False)
        pos = pos[..., :rows, :cols]
    tokens = tokens + pos.flatten(2).transpose(1, 2)
    tokens = torch.cat([get("model.patch_generator.cls_token.token").expand(batch, -1, -1), tokens], dim=1)
    for i in range(config.num_hidden_layers):
        block = Block(hidden, config.num_attention_heads, mlp_ratio=4.0, qkv_bias=True,
                      norm_layer=partial(torch.nn.LayerNorm, eps=1e-6)).eval()
        prefix = f"encoder.model_encoder.radio_model.model.blocks.{i}."
        block.load_state_dict({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)})
        tokens = block(tokens)
    skip = config.num_cls_tokens + config.num_registers
    return tokens[:, :config.num_cls_tokens][:, get("summary_idxs")].flatten(1), tokens[:, skip:]


def _neck_reference(state: dict, summary, features, rows: int, cols: int) -> torch.Tensor:
    """The official neck with plain tensor ops: per-patch linear, LN, sum of 4 neighbours in a row, LN; summary."""
    def norm(x, name):
        return torch.nn.functional.layer_norm(x, x.shape[-1:], state[f"{name}.weight"], state[f"{name}.bias"], 1e-6)

    x = norm(features @ state["encoder.conv1.weight"][:, :, 0].T + state["encoder.conv1.bias"], "encoder.layer_norm1")
    grid = x.reshape(x.shape[0], rows, cols, -1)[:, :, : cols // 4 * 4].reshape(x.shape[0], rows, cols // 4, 4, -1)
    x = torch.einsum("brgkc,ock->brgo", grid, state["encoder.conv2.weight"][:, :, 0]).flatten(1, 2)
    x = norm(x, "encoder.layer_norm2")
    s = norm(summary @ state["encoder.sum_proj.weight"].T + state["encoder.sum_proj.bias"], "encoder.layer_norm3")
    return torch.cat([x, s[:, None]], dim=1)


@pytest.mark.parametrize("size", [(176, 192), (96, 128)])  # the canvas (CPE table as is), a smaller one (scaled)
def test_forward_matches_official_radio_neck_and_an_mbart_decoder_without_positions(loaded, tmp_path, size):
    from safetensors.torch import load_file
    from transformers.models.mbart.configuration_mbart import MBartConfig
    from transformers.models.mbart.modeling_mbart import MBartDecoder

    model, processor = loaded
    model.save_pretrained(tmp_path)
    state = load_file(str(tmp_path / "model.safetensors"))  # official names: the reference reads those
    width, height = size
    pixels = torch.rand(2, 3, height, width, generator=torch.Generator().manual_seed(0))
    ids = torch.tensor([prompt_and(processor, "<x_0.1><y_0.2>Hello<x_0.3><y_0.4><class_Text>")] * 2)
    with torch.no_grad():
        out = model(pixel_values=pixels, decoder_input_ids=ids)
        radio = radio_config(model.config.encoder)
        summary, features = _radio_reference(state, pixels, radio)
        memory = _neck_reference(state, summary, features, height // 16, width // 16)
        decoder_config = MBartConfig(**model.config.decoder.to_dict())
        decoder = MBartDecoder(decoder_config).eval()
        weights = {k[len("decoder."):]: v for k, v in state.items() if k.startswith("decoder.")}
        weights["embed_positions.weight"] = torch.zeros_like(decoder.embed_positions.weight)  # no positions
        decoder.load_state_dict(weights)
        hidden = decoder(input_ids=ids, encoder_hidden_states=memory).last_hidden_state
        logits = hidden @ state["lm_head.weight"].T
    assert memory.shape == (2, (height // 16) * (width // 16 // 4) + 1, 32)
    torch.testing.assert_close(out.encoder_last_hidden_state, memory, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out.logits, logits, rtol=1e-4, atol=1e-5)


def test_encoder_is_transformers_radio_model_as_it_loads_the_official_radio_weights(loaded, tmp_path):
    """transformers' own RadioModel, loaded from the RADIO weights under their official names (its radio conversion,
    its identity LayerScale initialised to 1), gives the features and summary our encoder's RADIO gives."""
    from safetensors.torch import load_file, save_file
    from transformers import RadioModel

    model, _ = loaded
    model.save_pretrained(tmp_path / "full")
    prefix = "encoder.model_encoder."
    state = {k[len(prefix):]: v for k, v in load_file(str(tmp_path / "full" / "model.safetensors")).items()
             if k.startswith(prefix)}
    assert "radio_model.model.blocks.0.attn.qkv.weight" in state  # the remote RADIO model's own names
    radio = radio_config(model.config.encoder)
    radio.save_pretrained(tmp_path / "radio")
    save_file(state, str(tmp_path / "radio" / "model.safetensors"), metadata={"format": "pt"})
    standalone, info = RadioModel.from_pretrained(tmp_path / "radio", output_loading_info=True)
    assert info["unexpected_keys"] == set() and all("layer_scale" in k for k in info["missing_keys"])
    pixels = torch.rand(2, 3, 192, 176, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours, theirs = model.encoder.model_encoder(pixels), standalone.eval()(pixels)
    torch.testing.assert_close(ours.features, theirs.features, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours.summary, theirs.summary, rtol=1e-5, atol=1e-6)


def test_right_padding_leaves_the_real_positions_unchanged(loaded):
    model, processor = loaded
    pixels = pages(processor, (150, 200))
    ids = prompt_and(processor, "<x_0.1><y_0.2>Hello")
    padded = torch.tensor([[*ids, 1, 1, 1]])
    mask = torch.tensor([[1] * len(ids) + [0, 0, 0]])
    with torch.no_grad():
        alone = model(pixel_values=pixels, decoder_input_ids=torch.tensor([ids])).logits
        with_pad = model(pixel_values=pixels, decoder_input_ids=padded, decoder_attention_mask=mask).logits
    torch.testing.assert_close(with_pad[:, :len(ids)], alone, rtol=1e-5, atol=1e-5)


def test_generate_with_kv_cache_equals_without_and_runs_the_encoder_once(loaded):
    model, processor = loaded
    pixels = pages(processor, (150, 200), (300, 120))
    prompt = torch.tensor([processor.tokenizer(syntax.PROMPT, add_special_tokens=False).input_ids] * 2)
    calls = {"encoder": 0, "decoder_lengths": []}
    hooks = [model.encoder.register_forward_hook(lambda *a: calls.__setitem__("encoder", calls["encoder"] + 1)),
             model.decoder.register_forward_pre_hook(
                 lambda m, a, kw: calls["decoder_lengths"].append(kw["input_ids"].shape[1]), with_kwargs=True)]
    settings = {"max_new_tokens": 6, "do_sample": False, "repetition_penalty": 1.0, "output_scores": True,
                "return_dict_in_generate": True}
    try:
        cached = model.generate(pixel_values=pixels, decoder_input_ids=prompt, use_cache=True, **settings)
        assert calls["encoder"] == 1 and calls["decoder_lengths"] == [prompt.shape[1]] + [1] * 5
        plain = model.generate(pixel_values=pixels, decoder_input_ids=prompt, use_cache=False, **settings)
    finally:
        for hook in hooks:
            hook.remove()
    assert cached.sequences.shape == (2, prompt.shape[1] + 6)
    assert torch.equal(cached.sequences, plain.sequences)
    torch.testing.assert_close(torch.stack(cached.scores), torch.stack(plain.scores), rtol=1e-4, atol=1e-5)
    assert torch.equal(cached.sequences[:, :prompt.shape[1]], prompt)


def test_gradient_checkpointing_gives_the_same_loss_and_gradients(loaded):
    from transformers.modeling_layers import GradientCheckpointingLayer

    model, processor = loaded
    pixels = pages(processor, (150, 200))
    ids = torch.tensor([prompt_and(processor, "<x_0.1><y_0.2>Hello<x_0.3><y_0.4><class_Text>")])
    labels = torch.cat([ids[:, 1:], torch.tensor([[2]])], dim=1)
    layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
    assert len(layers) == 4  # 2 RADIO blocks, 2 decoder layers

    def step():
        model.zero_grad()
        torch.manual_seed(0)  # dropout (0.1 in the decoder): the same masks in both runs
        loss = model(pixel_values=pixels, decoder_input_ids=ids, labels=labels).loss
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    model.train()
    try:
        plain_loss, plain_grads = step()
        recomputed = []
        model.activation_checkpointing_enable({"use_reentrant": False})
        for layer in layers:
            inner = layer._gradient_checkpointing_func
            layer._gradient_checkpointing_func = lambda f, *a, _inner=inner, **k: recomputed.append(1) or _inner(
                f, *a, **k)
        ckpt_loss, ckpt_grads = step()
    finally:
        model.activation_checkpointing_disable()
        model.eval()
        model.zero_grad()
    assert len(recomputed) == 4
    assert torch.equal(plain_loss, ckpt_loss) and plain_grads.keys() == ckpt_grads.keys()
    for name, grad in plain_grads.items():
        torch.testing.assert_close(ckpt_grads[name], grad, rtol=1e-5, atol=1e-7, msg=name)


def test_attention_implementation_is_selectable(tiny_dir, loaded):
    from transformers import AutoModelForImageTextToText

    model, processor = loaded
    eager = AutoModelForImageTextToText.from_pretrained(tiny_dir, attn_implementation="eager").eval()
    assert eager.config._attn_implementation == "eager"
    assert eager.decoder.config._attn_implementation == "eager"
    assert eager.encoder.model_encoder.config._attn_implementation == "eager"
    assert model.encoder.model_encoder.config._attn_implementation == "sdpa"
    pixels = pages(processor, (150, 200))
    ids = torch.tensor([prompt_and(processor, "<x_0.1><y_0.2>Hello")])
    with torch.no_grad():
        torch.testing.assert_close(eager(pixel_values=pixels, decoder_input_ids=ids).logits,
                                   model(pixel_values=pixels, decoder_input_ids=ids).logits, rtol=1e-4, atol=1e-5)


def test_parts_and_layers(loaded):
    """The three parts by parameter-name prefix, the layer classes FSDP / checkpointing act on, and the encoder's
    refusal of a page whose sides are not multiples of the patch size."""
    model, _ = loaded
    neck = ("encoder.conv1", "encoder.layer_norm1", "encoder.conv2", "encoder.layer_norm2", "encoder.sum_proj",
            "encoder.layer_norm3")
    for name, _ in model.named_parameters():
        assert (name.startswith("encoder.model_encoder.") or name.startswith(neck)
                or name.startswith(("decoder.", "lm_head."))), name
    assert set(model._no_split_modules) == {"RadioLayer", "MBartDecoderLayer"}
    assert model.decoder.embed_tokens.padding_idx == 1  # as the official MBartScaledWordEmbedding: no grad for <pad>
    with pytest.raises(ValueError, match="multiples of its patch size 16"):
        model(pixel_values=torch.zeros(1, 3, 100, 64), decoder_input_ids=torch.tensor([[2]]))
