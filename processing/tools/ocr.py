"""OCR operator (`ocr`) on Tesseract.

MMAT-1M ran PaddleOCR (§3.2); we use Tesseract from Debian's `tesseract-ocr` package through
`pytesseract` because it needs no network and no weights download (DESIGN.md §5). The result text is
the recognised words in reading order, as the released RR data shows it (Fig. 4:
"-ocr information: ADEDNI").
"""

from __future__ import annotations

import shutil

from PIL import Image, ImageOps

from .base import OCR, Operator, fmt_box

NO_TEXT = "No text was recognized in the image."


def tesseract_available() -> bool:
    return shutil.which("tesseract") is not None


class TesseractOCR(Operator):
    """Recognise text with the Tesseract binary.

    Args:
        lang (`str`, *optional*, defaults to `"eng"`): Tesseract language pack(s), e.g. `"eng+deu"`.
        psm (`int`, *optional*, defaults to 11): page-segmentation mode. 11 ("sparse text") suits
            photos and scenes where words are scattered rather than laid out as a page.
        min_height (`int`, *optional*, defaults to 320): images shorter than this are upscaled first;
            Tesseract is tuned for ~30 px glyphs and misses text in thumbnails.
        min_confidence (`float`, *optional*, defaults to 30.0): words below this confidence are dropped.
    """

    name = OCR

    def __init__(self, lang: str = "eng", psm: int = 11, min_height: int = 320, min_confidence: float = 30.0):
        if not tesseract_available():
            raise ValueError("the `tesseract` binary is not on PATH; install it with `apt-get install tesseract-ocr`")
        import pytesseract

        self._tess = pytesseract
        self.lang = lang
        self.psm = psm
        self.min_height = min_height
        self.min_confidence = min_confidence

    def run(self, image: Image.Image, query: str | None = None) -> tuple[str, dict]:
        gray = ImageOps.grayscale(image.convert("RGB"))
        scale = max(1.0, self.min_height / max(1, gray.height))
        if scale > 1.0:
            gray = gray.resize((round(gray.width * scale), round(gray.height * scale)), Image.Resampling.LANCZOS)
        table = self._tess.image_to_data(
            gray, lang=self.lang, config=f"--psm {self.psm}", output_type=self._tess.Output.DICT
        )
        words = []
        for i, word in enumerate(table["text"]):
            word = word.strip()
            if not word or float(table["conf"][i]) < self.min_confidence:
                continue
            x0, y0 = table["left"][i] / gray.width, table["top"][i] / gray.height
            x1 = (table["left"][i] + table["width"][i]) / gray.width
            y1 = (table["top"][i] + table["height"][i]) / gray.height
            words.append({"text": word, "conf": float(table["conf"][i]), "box": fmt_box([x0, y0, x1, y1])})
        text = " ".join(w["text"] for w in words) if words else NO_TEXT
        return text, {"words": words}
