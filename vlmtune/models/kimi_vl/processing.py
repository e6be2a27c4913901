"""Kimi-VL's processor (``KimiVLProcessor``): the image processor, the tokenizer and the chat template.

The chat template writes one ``<|media_pad|>`` per image (inside ``<|media_start|>image<|media_content|>`` ...
``<|media_end|>``); the processor repeats it once per image token (each image's 2x2 patch groups), then tokenizes.
Saved in the official layout: ``preprocessor_config.json`` (the image processor), the tokenizer's files
(``tiktoken.model``, ``tokenizer_config.json``, plus ``tokenizer.json``) and ``chat_template.jinja``. The config
files keep the checkpoint's ``auto_map`` entries, so the remote-code modules they name are copied along from the
checkpoint the processor was loaded from (where it has them): engines that load Kimi-VL through remote code (vLLM,
SGLang with ``--trust-remote-code``) then read a saved folder as they read the original.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from transformers import BatchFeature, ProcessorMixin
from transformers.processing_utils import ProcessingKwargs
from transformers.utils import IMAGE_PROCESSOR_NAME, PROCESSOR_NAME

IMAGE_TOKEN = "<|media_pad|>"
CONFIG_FILES = ("config.json", "preprocessor_config.json", "tokenizer_config.json", "processor_config.json")


def checkpoint_file(source: str, name: str) -> Path | None:
    """`name` in the checkpoint `source` (a local folder, or a hub id already in the local cache), else None."""
    if Path(source).is_dir():
        path = Path(source) / name
        return path if path.is_file() else None
    from transformers.utils import cached_file

    try:
        found = cached_file(source, name, local_files_only=True, _raise_exceptions_for_missing_entries=False)
    except OSError:
        return None
    return Path(found) if found else None


def remote_code_files(source: str) -> list[Path]:
    """The remote-code modules the checkpoint's ``auto_map`` entries name (``module.Class`` -> ``module.py``)."""
    modules: set[str] = set()
    for name in CONFIG_FILES:
        path = checkpoint_file(source, name)
        auto_map = json.loads(path.read_text(encoding="utf-8")).get("auto_map", {}) if path else {}
        refs = [r for v in auto_map.values() for r in (v if isinstance(v, list) else [v]) if isinstance(r, str)]
        modules.update(ref.split("--")[-1].rsplit(".", 1)[0] for ref in refs)
    return [path for module in sorted(modules) if (path := checkpoint_file(source, f"{module}.py"))]


class KimiVLProcessorKwargs(ProcessingKwargs, total=False):
    _defaults = {"text_kwargs": {"padding": False}}  # noqa: RUF012 (a TypedDict: transformers reads this)


class KimiVLProcessor(ProcessorMixin):
    valid_processor_kwargs = KimiVLProcessorKwargs

    def __init__(self, image_processor=None, tokenizer=None, chat_template: str | None = None, **kwargs):
        super().__init__(image_processor, tokenizer, chat_template=chat_template, **kwargs)
        self.image_token = IMAGE_TOKEN
        self.image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN) if tokenizer is not None else None

    @classmethod
    def _load_tokenizer_from_pretrained(cls, sub_processor_type, pretrained_model_name_or_path, subfolder="",
                                        **kwargs):
        """Kimi-VL's own tokenizer class, whatever ``tokenizer_config.json`` names (the official files name the
        remote-code class ``TikTokenTokenizer``, which transformers does not have)."""
        from vlmtune.models.kimi_vl.tokenization import KimiVLTokenizer

        kwargs.pop("trust_remote_code", None)
        return KimiVLTokenizer.from_pretrained(pretrained_model_name_or_path, subfolder=subfolder, **kwargs)

    def __call__(self, images=None, text=None, **kwargs) -> BatchFeature:
        if images is None and text is None:
            raise ValueError("KimiVLProcessor needs text, images, or both")
        output_kwargs = self._merge_kwargs(KimiVLProcessorKwargs, tokenizer_init_kwargs=self.tokenizer.init_kwargs,
                                           **kwargs)
        return_tensors = output_kwargs["text_kwargs"].pop("return_tensors", None)
        image_inputs: dict = {}
        if images is not None:
            image_inputs = self.image_processor(images, return_tensors="pt")
        if text is None:
            return BatchFeature(data=dict(image_inputs), tensor_type=return_tensors)
        texts = [text] if isinstance(text, str) else list(text)
        if images is not None:
            texts = self.expand_image_tokens(texts, image_inputs["image_grid_hws"].tolist())
        text_inputs = self.tokenizer(texts, **output_kwargs["text_kwargs"])
        return BatchFeature(data={**text_inputs, **image_inputs}, tensor_type=return_tensors)

    def expand_image_tokens(self, texts: list[str], grids: list[list[int]]) -> list[str]:
        """Each ``<|media_pad|>`` (in order, across texts) -> one per token of its image."""
        found = sum(t.count(IMAGE_TOKEN) for t in texts)
        if found != len(grids):
            raise ValueError(f"the text has {found} {IMAGE_TOKEN} placeholder(s) but {len(grids)} image(s) were "
                             "given; render the conversation with the chat template, which writes one per image")
        merge = self.image_processor.merge_kernel_size[0] * self.image_processor.merge_kernel_size[1]
        counts = iter(h * w // merge for h, w in grids)
        return ["".join(part if i == 0 else IMAGE_TOKEN * next(counts) + part
                        for i, part in enumerate(t.split(IMAGE_TOKEN))) for t in texts]

    @property
    def model_input_names(self) -> list[str]:
        return list(dict.fromkeys(self.tokenizer.model_input_names + self.image_processor.model_input_names))

    def save_pretrained(self, save_directory, push_to_hub: bool = False, **kwargs):
        """The official layout: the image processor in ``preprocessor_config.json``, naming this processor class
        (not nested in ``processor_config.json``: this processor has no setting of its own beyond the chat
        template)."""
        if push_to_hub:
            raise NotImplementedError("push the saved folder with `hf upload` instead")
        files = super().save_pretrained(save_directory, **kwargs)
        nested = os.path.join(save_directory, PROCESSOR_NAME)
        if os.path.isfile(nested):
            os.remove(nested)
        written = self.image_processor.save_pretrained(save_directory)
        # The official file names the processor class (transformers 5 no longer writes it for image processors).
        path = os.path.join(save_directory, IMAGE_PROCESSOR_NAME)
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
        config["processor_class"] = self.__class__.__name__
        with open(path, "w", encoding="utf-8") as f:
            f.write(json.dumps(config, indent=2, sort_keys=True) + "\n")
        copied = []
        for src in remote_code_files(self.tokenizer.name_or_path) if self.tokenizer.name_or_path else []:
            dst = Path(save_directory) / src.name
            if src.resolve() != dst.resolve():
                shutil.copyfile(src, dst)
            copied.append(str(dst))
        return [*(f for f in files if f != nested), *written, *copied]
