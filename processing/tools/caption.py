"""Image caption operator (`image_caption`) on a local vision-language model.

MMAT-1M captioned with GPT-4o in two steps, scene graph then caption (§3.2, Fig. 5). This back-end
asks any local `image-text-to-text` checkpoint for one concise description; the two-step variant
is a teacher concern (the scene graph needs the question) and lives with the teachers.
"""

from __future__ import annotations

import os

from PIL import Image

from .base import IMAGE_CAPTION, Operator

DEFAULT_PROMPT = "Describe this image in one concise sentence."


class PipelineCaptioner(Operator):
    """Caption an image with the `image-text-to-text` pipeline.

    Args:
        model_path (`str`): local folder of an image-text-to-text checkpoint with a processor.
        prompt (`str`, *optional*): instruction sent with the image; a query passed to :meth:`run`
            (for example the scene graph) is appended to it.
        max_new_tokens (`int`, *optional*, defaults to 48): caption length cap.
        device (`str`, *optional*, defaults to `"cpu"`): torch device of the pipeline.
    """

    name = IMAGE_CAPTION

    def __init__(self, model_path: str, prompt: str = DEFAULT_PROMPT, max_new_tokens: int = 48, device: str = "cpu"):
        if not os.path.isdir(model_path):
            raise ValueError(f"captioner weights must be a local folder, got {model_path!r}")
        from transformers import pipeline

        self.pipe = pipeline("image-text-to-text", model=model_path, device=device)
        self.prompt = prompt
        self.max_new_tokens = max_new_tokens

    def run(self, image: Image.Image, query: str | None = None) -> tuple[str, dict]:
        instruction = self.prompt if not query else f"{self.prompt}\nScene Graph: {query}"
        chat = [
            {
                "role": "user",
                "content": [{"type": "image", "image": image.convert("RGB")}, {"type": "text", "text": instruction}],
            }
        ]
        out = self.pipe(
            text=chat,
            return_full_text=False,
            generate_kwargs={"max_new_tokens": self.max_new_tokens, "do_sample": False},
        )
        generated = out[0]["generated_text"]
        if isinstance(generated, list):  # some versions return the chat with the reply appended
            generated = generated[-1]["content"]
        # Control characters would corrupt the rendered dialogue; real captioners do not emit them.
        caption = " ".join("".join(ch for ch in str(generated) if ch.isprintable() or ch.isspace()).split())
        return caption, {"caption": caption}
