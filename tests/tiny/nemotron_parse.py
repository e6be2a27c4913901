"""Nemotron-Parse tiny model: the official config.json shrunk in width and depth, official processor settings except
the canvas size, and a tokenizer with the real special, task, coordinate and class tokens at their real ids.

- Encoder: C-RADIO with its real patch size (16), 2 layers of width 32, the real 4 class tokens + 4 registers and
  3-teacher summary; CPE table for 192 px; pages on a 192 x 176 canvas (12 x 11 patches, so the neck's (1, 4)
  convolution drops the last 3 patch columns of each row, as 103 % 4 = 3 does for the real 2048 x 1648).
- Decoder: 2 mBART layers of width 32, the real vocabulary (52,352 rows) and token ids.
- Tokenizer: the real tokenizer.json pipeline (normalizer, pre-tokenizer, post-processor, decoder, read from the
  checkpoint's file; see tests/assets/nemotron-parse/SOURCE.md) over a small byte-level BPE: ids 0-22 the Galactica
  specials, 23-278 the 256 byte symbols in the real order, then merges learned on a few sentences, unreachable
  fillers up to 49,999, and the 2,327 added tokens at 50000-52326 (vlmtune.models.nemotron_parse.syntax).
"""

from __future__ import annotations

import json
from pathlib import Path

from tiny.common import ASSETS, TinySpec, deep_update

ASSET = ASSETS / "nemotron-parse"
CANVAS = (192, 176)  # (height, width)
ENCODER = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2}
# hidden_size and num_hidden_layers are MBartConfig aliases of d_model and encoder_layers, both in the real dict.
DECODER = {"d_model": 32, "hidden_size": 32, "decoder_layers": 2, "decoder_attention_heads": 4, "decoder_ffn_dim": 64,
           "encoder_layers": 2, "num_hidden_layers": 2, "encoder_attention_heads": 4, "encoder_ffn_dim": 64,
           "dropout": 0.0}  # the real 0.1 would make 1-rank / 2-rank and resumed / straight runs differ by chance
GALACTICA_SPECIALS = ("<s>", "<pad>", "</s>", "<unk>", "[START_REF]", "[END_REF]", "[IMAGE]", "<fragments>",
                      "</fragments>", "<work>", "</work>", "[START_SUP]", "[END_SUP]", "[START_SUB]", "[END_SUB]",
                      "[START_DNA]", "[END_DNA]", "[START_AMINO]", "[END_AMINO]", "[START_SMILES]", "[END_SMILES]",
                      "[START_I_SMILES]", "[END_I_SMILES]")
BPE_SIZE = 50000  # the real BPE vocabulary: added tokens start at 50000
CORPUS = (
    "# Introduction\n\nImage restoration aims at reconstructing a high-quality image from its low-quality "
    "observation. Typical problems are denoising, deblurring and super-resolution.",
    "| Item | Price |\n| --- | --- |\n| Coffee | 3.50 |\n| Tea | 2.75 |",
    "\\begin{tabular}{ll} Name & Value \\\\ alpha & 0.5 \\end{tabular}",
    "The results in Table 2 show that the proposed method improves the baseline by 4.1 points on average.",
    "<sup>1</sup>University of Somewhere, Department of Document Understanding, 2025.",
)
# The real tokenizer.json's pipeline, as its JSON (tests/assets/nemotron-parse/SOURCE.md).
PUNCTUATION = "[\\(\\)\\[\\]\\{\\}]|([!\"\\#\\$%\\&'\\*\\+,\\-\\./:;<=>\\?\\\\\\^_`\\|\\~])\\1*"
PIPELINE = {
    "normalizer": {"type": "NFKC"},
    "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"String": "SPL1T-TH1S-Pl3A5E"}, "behavior": "Removed", "invert": False},
        {"type": "Digits", "individual_digits": True},
        {"type": "Split", "pattern": {"Regex": PUNCTUATION}, "behavior": "Isolated", "invert": False},
        {"type": "Split", "pattern": {"String": "\n"}, "behavior": "Isolated", "invert": False},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}]},
    "post_processor": {
        "type": "TemplateProcessing",
        "single": [{"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                   {"SpecialToken": {"id": "</s>", "type_id": 0}}],
        "pair": [{"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
        "special_tokens": {"</s>": {"id": "</s>", "ids": [2], "tokens": ["</s>"]},
                           "<s>": {"id": "<s>", "ids": [0], "tokens": ["<s>"]}}},
    "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
}


def read_json(path: Path) -> dict:
    return json.loads(Path(path).read_text())


def tiny_config() -> dict:
    real = read_json(ASSET / "config.json")
    cfg = deep_update(real, {"decoder": DECODER, "encoder": {**ENCODER, "args": {"cpe_max_size": CANVAS[0]}},
                             "image_size": list(CANVAS)})
    for d in (cfg, cfg["decoder"]):
        d.pop("torch_dtype", None)
        d.pop("transformers_version", None)
    return cfg


def _merges() -> list[list[str]]:
    """BPE merges learned on CORPUS through the real pre-tokenizer (deterministic: counts, then pair order)."""
    from tokenizers import Tokenizer
    from tokenizers.pre_tokenizers import ByteLevel
    from tokenizers.trainers import BpeTrainer

    tok = Tokenizer.from_str(json.dumps({**_skeleton({}, []), "added_tokens": []}))
    trainer = BpeTrainer(vocab_size=600, min_frequency=2, show_progress=False, initial_alphabet=ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer)
    merges = json.loads(tok.to_str())["model"]["merges"]
    return [m.split(" ") if isinstance(m, str) else list(m) for m in merges]


def _skeleton(vocab: dict[str, int], merges: list) -> dict:
    model = {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
             "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
             "vocab": vocab, "merges": merges}
    return {"version": "1.0", "truncation": None, "padding": None, **PIPELINE, "model": model}


def tokenizer_json() -> dict:
    from tokenizers.pre_tokenizers import ByteLevel

    from vlmtune.models.nemotron_parse import syntax

    vocab = {t: i for i, t in enumerate(GALACTICA_SPECIALS)}
    for symbol in sorted(ByteLevel.alphabet()):  # the real file lists the byte symbols by code point
        vocab[symbol] = len(vocab)
    merges = [m for m in _merges() if "".join(m) not in vocab]
    for a, b in merges:
        vocab.setdefault(a + b, len(vocab))
    while len(vocab) < BPE_SIZE:  # unreachable (no merge builds them): they only hold the real ids' places
        vocab[f"<unused_{len(vocab)}>"] = len(vocab)

    def added(token_id: int, content: str, special: bool) -> dict:
        return {"id": token_id, "content": content, "single_word": False, "lstrip": False, "rstrip": False,
                "normalized": not special, "special": special}

    tokens = [added(i, t, True) for i, t in enumerate(GALACTICA_SPECIALS)]
    for offset, content in enumerate(syntax.added_tokens()):
        tokens.append(added(BPE_SIZE + offset, content, content in syntax.TASK_TOKENS))
    return {**_skeleton(vocab, merges), "added_tokens": tokens}


def official_tokenizer_config() -> dict:
    """The checkpoint's tokenizer_config.json, rebuilt from its layout: equal in length (413,947 characters) and, at
    every offset compared, in text to the official file (tests/assets/nemotron-parse/SOURCE.md)."""
    from vlmtune.models.nemotron_parse import syntax

    def entry(content: str, special: bool) -> dict:
        return {"content": content, "lstrip": False, "normalized": not special, "rstrip": False,
                "single_word": False, "special": special}

    tokens = {str(i): entry(t, True) for i, t in enumerate(GALACTICA_SPECIALS)}
    for offset, content in enumerate(syntax.added_tokens()):
        tokens[str(BPE_SIZE + offset)] = entry(content, content in syntax.TASK_TOKENS)
    return {"added_tokens_decoder": tokens, "additional_special_tokens": ["<predict_classes>"], "bos_token": "<s>",
            "clean_up_tokenization_spaces": False, "eos_token": "</s>", "extra_special_tokens": {},
            "max_length": 9000, "model_max_length": 9000, "pad_to_multiple_of": None, "pad_token": "<pad>",
            "pad_token_type_id": 0, "padding_side": "right", "processor_class": "NemotronParseProcessor",
            "stride": 0, "tokenizer_class": "PreTrainedTokenizerFast", "truncation_side": "right",
            "truncation_strategy": "longest_first", "unk_token": "<unk>", "vocab_file": None}


def write_official_tokenizer(folder: Path) -> None:
    """The tokenizer files as the checkpoint has them: tokenizer.json (tiny BPE, real pipeline and added tokens),
    the rebuilt tokenizer_config.json and the real special_tokens_map.json."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "tokenizer.json").write_text(json.dumps(tokenizer_json(), indent=2, ensure_ascii=False))
    config = json.dumps(official_tokenizer_config(), indent=2, ensure_ascii=False) + "\n"
    (folder / "tokenizer_config.json").write_text(config)
    (folder / "special_tokens_map.json").write_text((ASSET / "special_tokens_map.json").read_text())


def build_tokenizer():
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    special = read_json(ASSET / "special_tokens_map.json")
    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(json.dumps(tokenizer_json())),
        bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>",
        additional_special_tokens=[t["content"] for t in special["additional_special_tokens"]],
        model_max_length=9000, padding_side="right", clean_up_tokenization_spaces=False,
    )


def build(out: Path) -> Path:
    import torch
    from transformers import GenerationConfig

    from vlmtune.models.nemotron_parse import register
    from vlmtune.models.nemotron_parse.configuration import NemotronParseConfig
    from vlmtune.models.nemotron_parse.modeling import NemotronParseForConditionalGeneration
    from vlmtune.models.nemotron_parse.processing import NemotronParseImageProcessor, NemotronParseProcessor

    register()
    out = Path(out)
    torch.manual_seed(0)
    model = NemotronParseForConditionalGeneration(NemotronParseConfig(**tiny_config()))
    model.save_pretrained(out)
    settings = read_json(ASSET / "preprocessor_config.json")
    settings.update(size={"height": CANVAS[0], "width": CANVAS[1], "longest_edge": list(CANVAS)},
                    final_size=list(CANVAS))
    image_processor = NemotronParseImageProcessor.from_dict(settings)
    NemotronParseProcessor(image_processor, build_tokenizer()).save_pretrained(out)
    write_official_tokenizer(out)  # the checkpoint's own tokenizer files, not transformers 5's rewrite of them
    GenerationConfig.from_dict(read_json(ASSET / "generation_config.json")).save_pretrained(out)
    return out


SPECS = [TinySpec("nemotron_parse", build, "nemotron_parse", multi_image=False, text_only=False)]
