"""Published numbers shown next to our runs for reference: MMAT-1M (arXiv 2507.21924) Tables 3-4 and OmniSearch /
Dyn-VQA (arXiv 2411.02937) Table 4, transcribed from those tables.

HallusionBench's score is per-question accuracy (VLMEvalKit's aAcc; fAcc and qAcc are reported beside it);
MMAT-1M's Table 3 does not say which of aAcc / fAcc / qAcc (or their mean) its column holds, so that column compares
like with like only if it is aAcc.

They come from other setups (Google search with top-3, GPT-4o as teacher, an unstated Dyn-VQA
month and language split), so they frame a run; they are not targets a local corpus can reproduce.
"""

from __future__ import annotations

# MMAT-1M Table 3. OCRBench on its 0-1000 scale; the paper's Average divides it by 10.
MMAT_BENCHMARKS = ("MMStar", "MMMU", "MathVista", "MathVision", "AI2D", "OCRBench", "RealWorldQA", "HallusionBench")
MMAT_TABLE3 = {
    "GPT-4o": (65.1, 70.7, 60.0, 30.4, 84.9, 806, 76.5, 56.2),
    "Llama-3.2-11B-Vision-Instruct": (47.7, 50.3, 48.0, 16.4, 77.1, 756, 63.4, 39.4),
    "Llama-3.2-11B-Vision-Instruct-ORR": (50.7, 47.8, 50.1, 17.7, 78.9, 806, 66.7, 44.4),
    "Llama-3.2-11B-Vision-Instruct-RR": (51.4, 51.0, 49.1, 16.8, 77.9, 784, 69.3, 48.3),
    "MiniCPM-V-2.6": (56.5, 47.1, 60.3, 22.4, 81.5, 843, 65.0, 47.1),
    "MiniCPM-V-2.6-ORR": (56.9, 47.9, 60.6, 23.4, 81.7, 848, 66.6, 48.8),
    "MiniCPM-V-2.6-RR": (58.5, 49.2, 61.9, 25.3, 82.0, 840, 68.0, 50.0),
    "InternVL2.5-2B": (53.6, 43.2, 50.1, 16.1, 75.1, 804, 60.5, 42.6),
    "InternVL2.5-2B-ORR": (55.4, 44.7, 50.1, 14.1, 77.5, 819, 69.5, 42.4),
    "InternVL2.5-2B-RR": (54.9, 44.4, 52.6, 16.5, 77.2, 799, 68.0, 43.8),
    "InternVL2.5-4B": (58.6, 51.8, 60.8, 21.7, 81.2, 823, 64.6, 46.5),
    "InternVL2.5-4B-ORR": (59.2, 50.7, 61.4, 19.7, 81.4, 824, 69.2, 51.9),
    "InternVL2.5-4B-RR": (60.9, 53.1, 62.0, 22.4, 82.7, 805, 72.2, 50.7),
    "InternVL2.5-8B": (62.4, 53.1, 64.5, 20.1, 84.1, 819, 69.4, 49.8),
    "InternVL2.5-8B-ORR": (64.8, 55.4, 63.8, 20.8, 83.5, 849, 73.0, 53.3),
    "InternVL2.5-8B-RR": (65.3, 57.3, 64.8, 21.7, 84.2, 839, 74.4, 55.8),
}

# MMAT-1M Table 4: Dyn-VQA F1-recall, "Query" (model-written queries) and "Golden Query".
# None where the paper prints "/".
MMAT_DYNVQA = {
    "GPT-4o": (52.0, 61.5),
    "OmniSearch (GPT-4V)": (50.0, None),
    "Llama-3.2-11B-Vision-Instruct": (29.4, 34.6),
    "Llama-3.2-11B-Vision-Instruct-RR": (38.0, 45.1),
    "MiniCPM-V-2.6": (32.7, 39.2),
    "MiniCPM-V-2.6-RR": (35.9, 44.4),
    "InternVL2.5-2B": (19.3, 26.0),
    "InternVL2.5-2B-RR": (30.9, 38.8),
    "InternVL2.5-4B": (23.3, 31.1),
    "InternVL2.5-4B-RR": (35.4, 42.1),
    "InternVL2.5-8B": (27.0, 35.2),
    "InternVL2.5-8B-RR": (36.8, 44.0),
}

# OmniSearch Table 4, "Original (M)LLMs" (no retrieval) and "+ Web Pages with Gloden Query":
# (zh, en, all) F1-recall.
OMNISEARCH_DIRECT = {
    "Qwen-VL-Chat": (16.92, 13.58, 15.28),
    "Qwen-7B-Chat": (10.48, 10.46, 10.47),
    "Qwen-VL-Max": (22.81, 37.32, 29.96),
    "GPT-4V": (26.44, 34.18, 30.25),
}
OMNISEARCH_GOLDEN = {
    "Qwen-VL-Chat": (43.88, 48.90, 46.35),
    "Qwen-7B-Chat": (46.02, 52.88, 49.40),
    "Qwen-VL-Max": (49.83, 53.33, 51.56),
    "GPT-4V": (51.08, 58.07, 54.52),
}
OMNISEARCH_AGENT = {
    "OmniSearch (Qwen-VL-Chat)": (39.22, 43.23, 41.20),
    "OmniSearch (GPT-4V)": (46.96, 53.21, 50.03),
}

PAPER_SETUP_NOTE = (
    "Paper numbers: MMAT-1M Tables 3-4 (Google search, top-3, Dyn-VQA 'latest version', split not "
    "stated) and OmniSearch Table 4 (SerpAPI; data month not stated). Not comparable with a local corpus. "
    "Our HallusionBench is per-question accuracy (aAcc); the paper does not name its variant."
)


def mmat_table3_row(model: str) -> dict[str, float]:
    """Table 3 numbers of one model by benchmark name."""
    if model not in MMAT_TABLE3:
        raise ValueError(f"no Table 3 row for {model!r}; known: {sorted(MMAT_TABLE3)}")
    return dict(zip(MMAT_BENCHMARKS, MMAT_TABLE3[model]))


def mmat_average(scores: dict[str, float]) -> float:
    """The paper's Average: mean of the eight with OCRBench divided by 10."""
    values = [scores[b] / 10 if b == "OCRBench" else scores[b] for b in MMAT_BENCHMARKS]
    return sum(values) / len(values)
