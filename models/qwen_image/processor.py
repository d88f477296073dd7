"""Qwen2.5-VL's processor for prompts that show the model an image, without its video half.

transformers 5 builds `Qwen2VLProcessor` with a video processor, which needs torchvision even
when no video is ever passed. Qwen-Image-Edit only shows the text encoder one image, so this
subclass leaves the video processor out; it loads the `processor/` folder of a Qwen-Image-Edit
checkpoint (its tokenizer and image-processor files) and tokenizes exactly as Qwen2VLProcessor
does. With torchvision installed, `transformers.Qwen2VLProcessor` works in its place."""
from __future__ import annotations

from transformers import Qwen2VLProcessor


class Qwen2VLImageTextProcessor(Qwen2VLProcessor):
    """Qwen2VLProcessor for text and images only (the attributes ProcessorMixin loads come from __init__)."""

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        super().__init__(image_processor, tokenizer, None, chat_template=chat_template, **kwargs)
