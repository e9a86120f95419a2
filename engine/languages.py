"""The language registry: ISO 639-1 code -> name, script and each source's or benchmark's own code.

The study-file validator relies on `get_language`, `closest_codes` and `LANGUAGES[code].mc4`.
"""
from __future__ import annotations

import difflib
import string
from dataclasses import dataclass


@dataclass(frozen=True)
class Language:
    code: str  # ISO 639-1
    name: str
    script: str  # ISO 15924
    iso639_3: str
    mc4: str | None  # config name in mC4 (allenai/c4); None where mC4 has no such language
    flores: str | None  # FLORES-200 / Belebele code, e.g. deu_Latn

    def source_code(self, source: str) -> str | None:
        """This language's code in `source` (a column of the registry), or None if the source lacks it."""
        if source in ("iso", "iso639_1", "lang"):
            return self.code
        return getattr(self, source, None)


def _lang(code: str, name: str, script: str, iso3: str, mc4: str | None = "=", flores: str | None = "=") -> Language:
    return Language(
        code=code,
        name=name,
        script=script,
        iso639_3=iso3,
        mc4=code if mc4 == "=" else mc4,
        flores=f"{iso3}_{script}" if flores == "=" else flores,
    )


# The seven languages of the reference study first, then other mC4 languages users commonly add.
LANGUAGES: dict[str, Language] = {
    lang.code: lang
    for lang in [
        _lang("ar", "Arabic", "Arab", "ara", flores="arb_Arab"),
        _lang("de", "German", "Latn", "deu"),
        # allenai/c4 config `en` is the original English C4 (en/c4-train.*); mC4's English is config
        # `en-multi` (multilingual/c4-en.*), per the configs in the dataset's README.md.
        _lang("en", "English", "Latn", "eng", mc4="en-multi"),
        _lang("es", "Spanish", "Latn", "spa"),
        _lang("ru", "Russian", "Cyrl", "rus"),
        _lang("sw", "Swahili", "Latn", "swa", flores="swh_Latn"),
        _lang("zh", "Chinese", "Hans", "zho", flores="zho_Hans"),
        _lang("bn", "Bengali", "Beng", "ben"),
        _lang("cs", "Czech", "Latn", "ces"),
        _lang("el", "Greek", "Grek", "ell"),
        _lang("fa", "Persian", "Arab", "fas", flores="pes_Arab"),
        _lang("fi", "Finnish", "Latn", "fin"),
        _lang("fr", "French", "Latn", "fra"),
        _lang("he", "Hebrew", "Hebr", "heb", mc4="iw"),
        _lang("hi", "Hindi", "Deva", "hin"),
        _lang("id", "Indonesian", "Latn", "ind"),
        _lang("it", "Italian", "Latn", "ita"),
        _lang("ja", "Japanese", "Jpan", "jpn"),
        _lang("ko", "Korean", "Kore", "kor", flores="kor_Hang"),
        _lang("nl", "Dutch", "Latn", "nld"),
        _lang("pl", "Polish", "Latn", "pol"),
        _lang("pt", "Portuguese", "Latn", "por"),
        _lang("ro", "Romanian", "Latn", "ron"),
        _lang("sv", "Swedish", "Latn", "swe"),
        _lang("ta", "Tamil", "Taml", "tam"),
        _lang("te", "Telugu", "Telu", "tel"),
        _lang("th", "Thai", "Thai", "tha"),
        _lang("tr", "Turkish", "Latn", "tur"),
        _lang("uk", "Ukrainian", "Cyrl", "ukr"),
        _lang("ur", "Urdu", "Arab", "urd"),
        _lang("vi", "Vietnamese", "Latn", "vie"),
        _lang("yo", "Yoruba", "Latn", "yor"),
    ]
}



class UnknownLanguageError(KeyError):
    def __init__(self, code: str):
        self.code = code
        near = closest_codes(code)
        hint = f" (did you mean {', '.join(repr(c) for c in near)}?)" if near else ""
        super().__init__(f"unknown language code {code!r}{hint}; known: {', '.join(sorted(LANGUAGES))}")

    def __str__(self) -> str:  # KeyError quotes its message otherwise
        return self.args[0]


def get_language(code: str) -> Language:
    try:
        return LANGUAGES[code]
    except KeyError:
        raise UnknownLanguageError(code) from None


def closest_codes(code: str, n: int = 3) -> list[str]:
    by_name = {lang.name.lower(): lang.code for lang in LANGUAGES.values()}
    by_iso3 = {lang.iso639_3: lang.code for lang in LANGUAGES.values()}
    lowered = str(code).lower()
    if lowered in by_name:
        return [by_name[lowered]]
    if lowered in by_iso3:
        return [by_iso3[lowered]]
    return difflib.get_close_matches(lowered, list(LANGUAGES), n=n, cutoff=0.5)


# Which of a language's codes each benchmark family uses in its lm-eval task names, so a study can write
# `belebele_{lang}` and get belebele_deu_Latn. Families not listed use the ISO 639-1 code.
BENCHMARK_CODE_FIELD: dict[str, str] = {
    "belebele": "flores",
    "flores": "flores",
    "xnli": "code",
    "xstorycloze": "code",
    "xcopa": "code",
    "xwinograd": "code",
    "arc": "code",  # Okapi's multilingual ARC
    "hellaswag": "code",  # Okapi's multilingual HellaSwag
    "m_mmlu": "code",  # Okapi's multilingual MMLU
    "global_mmlu": "code",
    "mgsm_direct": "code",
}


def benchmark_family(template: str) -> str:
    """'belebele_{lang}' -> 'belebele'; 'global_mmlu_{lang}' -> 'global_mmlu'."""
    return template.split("{", 1)[0].rstrip("_")


def resolve_task(template: str, code: str) -> str | None:
    """The lm-eval task name for `template` in language `code`, or None if the language has no code in
    the scheme the template asks for. `{lang}` means the benchmark family's own code; `{flores}`,
    `{mc4}`, `{iso639_3}` and `{code}` name a scheme explicitly."""
    language = get_language(code)
    field = BENCHMARK_CODE_FIELD.get(benchmark_family(template), "code")
    codes = {
        "lang": getattr(language, field),
        "code": language.code,
        "flores": language.flores,
        "mc4": language.mc4,
        "iso639_3": language.iso639_3,
    }
    try:
        needed = [name for _, name, _, _ in string.Formatter().parse(template) if name]
    except ValueError:
        return None
    if any(codes.get(name) is None for name in needed):
        return None
    return template.format(**codes)
