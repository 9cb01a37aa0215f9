"""The GGUF output types xquant writes, as one registry.

Two kinds:
- *direct* types (f32, f16, bf16, q8_0, q4_0, q4_1, q5_0, q5_1) are quantized tensor by tensor by
  the `gguf` package's numpy quantizers while the file is written: every 2-D weight gets the type,
  1-D tensors (norms) stay F32 — the layout llama.cpp's own `convert_hf_to_gguf.py` writes;
- *llama.cpp* types (k-quants, i-quants) are made by llama.cpp's quantizer (`llama_model_quantize`,
  through llama-cpp-python) from an unquantized GGUF written first. llama.cpp picks the per-tensor
  mixture itself (e.g. Q4_K_M keeps half of attn_v/ffn_down at Q6_K).

`needs_imatrix` follows llama.cpp's rule (src/llama-quant.cpp): the quantizer of the llama.cpp in
llama-cpp-python 0.3.36 refuses the file types IQ1_S, IQ1_M, IQ2_XXS, IQ2_XS, IQ2_S, IQ2_M, IQ3_XXS
and Q2_K_S without an importance matrix (tests/test_gguf.py checks this table against it).
`uses_imatrix` says whether llama.cpp's quantizer for the type takes one into account at all.
"""

from __future__ import annotations

from dataclasses import dataclass

from gguf import GGMLQuantizationType as Q
from gguf import LlamaFileType as F

from ..errors import UnsupportedError

# Rows are quantized in chunks of about this many values, bounding the quantizer's float temporaries.
CHUNK_VALUES = 16 * 2**20


@dataclass(frozen=True)
class OutType:
    name: str
    ftype: F  # general.file_type
    direct: Q | None  # the type of 2-D weights when written directly; None: made by llama.cpp
    uses_imatrix: bool = False
    needs_imatrix: bool = False
    bits: float = 16.0  # approximate bits per weight, for the size estimate of --dry-run

    @property
    def by_llama_cpp(self) -> bool:
        return self.direct is None


_TYPES: dict[str, OutType] = {}


def _register(name: str, ftype: F, direct: Q | None = None, *, bits: float, uses: bool = True,
              needs: bool = False) -> None:
    _TYPES[name] = OutType(name, ftype, direct, uses_imatrix=uses, needs_imatrix=needs, bits=bits)


_register("f32", F.ALL_F32, Q.F32, bits=32, uses=False)
_register("f16", F.MOSTLY_F16, Q.F16, bits=16, uses=False)
_register("bf16", F.MOSTLY_BF16, Q.BF16, bits=16, uses=False)
_register("q8_0", F.MOSTLY_Q8_0, Q.Q8_0, bits=8.5, uses=False)  # llama.cpp's Q8_0 ignores an imatrix
_register("q4_0", F.MOSTLY_Q4_0, Q.Q4_0, bits=4.5)
_register("q4_1", F.MOSTLY_Q4_1, Q.Q4_1, bits=5.0)
_register("q5_0", F.MOSTLY_Q5_0, Q.Q5_0, bits=5.5)
_register("q5_1", F.MOSTLY_Q5_1, Q.Q5_1, bits=6.0)
_register("q2_k", F.MOSTLY_Q2_K, bits=3.0)
_register("q2_k_s", F.MOSTLY_Q2_K_S, bits=2.8, needs=True)
_register("q3_k_s", F.MOSTLY_Q3_K_S, bits=3.5)
_register("q3_k_m", F.MOSTLY_Q3_K_M, bits=3.9)
_register("q3_k_l", F.MOSTLY_Q3_K_L, bits=4.3)
_register("q4_k_s", F.MOSTLY_Q4_K_S, bits=4.6)
_register("q4_k_m", F.MOSTLY_Q4_K_M, bits=4.9)
_register("q5_k_s", F.MOSTLY_Q5_K_S, bits=5.5)
_register("q5_k_m", F.MOSTLY_Q5_K_M, bits=5.7)
_register("q6_k", F.MOSTLY_Q6_K, bits=6.6)
_register("iq4_xs", F.MOSTLY_IQ4_XS, bits=4.3)
_register("iq4_nl", F.MOSTLY_IQ4_NL, bits=4.5)
_register("iq3_m", F.MOSTLY_IQ3_M, bits=3.7)
_register("iq3_s", F.MOSTLY_IQ3_S, bits=3.5)
_register("iq3_xxs", F.MOSTLY_IQ3_XXS, bits=3.1, needs=True)
_register("iq2_m", F.MOSTLY_IQ2_M, bits=2.7, needs=True)
_register("iq2_s", F.MOSTLY_IQ2_S, bits=2.5, needs=True)
_register("iq2_xs", F.MOSTLY_IQ2_XS, bits=2.3, needs=True)
_register("iq2_xxs", F.MOSTLY_IQ2_XXS, bits=2.1, needs=True)
_register("iq1_m", F.MOSTLY_IQ1_M, bits=1.8, needs=True)
_register("iq1_s", F.MOSTLY_IQ1_S, bits=1.6, needs=True)


def known() -> list[str]:
    return list(_TYPES)


def get(name: str) -> OutType:
    try:
        return _TYPES[name.lower()]
    except KeyError:
        raise UnsupportedError(f"unknown GGUF type '{name}' (known: {', '.join(known())})") from None


def intermediate_for(source_dtypes: set[str]) -> OutType:
    """The unquantized type llama.cpp quantizes from: the source's own precision, so nothing is
    rounded twice (bf16 stays bf16, f16 stays f16, anything else is written as f32)."""
    if source_dtypes == {"bfloat16"}:
        return _TYPES["bf16"]
    if source_dtypes == {"float16"}:
        return _TYPES["f16"]
    return _TYPES["f32"]
