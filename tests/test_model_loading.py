"""Loading a processor: recipe options reach the image / video processor, in the form transformers 5.25 expects."""

from __future__ import annotations

import warnings

from PIL import Image

from vlmtune.config import ModelConfig
from vlmtune.encode import SampleEncoder
from vlmtune.families import family_for
from vlmtune.model import load_processor


def test_pixel_budget_options_set_the_processors_not_the_calls(tiny_model_dir):
    """`model.processor_kwargs: {min_pixels, max_pixels}` sets the Qwen image and video processors' size at load;
    the tokenizer does not keep them (the processor would pass them back into every call, which transformers
    5.25 deprecates), and encoding a sample raises no deprecation warning."""
    options = {"min_pixels": 28 * 28, "max_pixels": 56 * 56}
    processor = load_processor(ModelConfig(name_or_path=str(tiny_model_dir), processor_kwargs=options))
    for sub in (processor.image_processor, processor.video_processor):
        assert (sub.size.shortest_edge, sub.size.longest_edge) == (28 * 28, 56 * 56)
    assert not {"min_pixels", "max_pixels"} & processor.tokenizer.init_kwargs.keys()
    encoder = SampleEncoder(processor, family_for("qwen2_5_vl"), 512)
    conversation = [
        {"role": "user", "content": [{"type": "image", "image": Image.new("RGB", (224, 224))},
                                     {"type": "text", "text": "What is this?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "A square."}]}]
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        warnings.simplefilter("error", DeprecationWarning)
        sample = encoder(conversation, 0)
    # 224 x 224 capped at 56 x 56 pixels: 4 x 4 patches of 14 px, merged 2 x 2 -> 4 image tokens.
    assert int((sample.tensors["input_ids"] == processor.image_token_id).sum()) == 4


def test_options_of_the_processor_itself_still_reach_it(tiny_model_dir):
    """An option no image / video processor takes goes to from_pretrained, as before (here a tokenizer option)."""
    processor = load_processor(ModelConfig(name_or_path=str(tiny_model_dir),
                                           processor_kwargs={"model_max_length": 123, "max_pixels": 56 * 56}))
    assert processor.tokenizer.model_max_length == 123
    assert processor.image_processor.size.longest_edge == 56 * 56


def test_loader_workers_never_exceed_the_cores_of_the_process(monkeypatch):
    """data.num_workers is lowered to the cores this process may use (its share under torchrun)."""
    from vlmtune.train import loader_workers

    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0, 1})
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert [loader_workers(n) for n in (0, 1, 2, 4)] == [0, 1, 2, 2]
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert loader_workers(4) == 1
