"""A Hugging Face LLaMA -> Meta's original layout: the exact inverse of the Meta -> HF conversion.

It makes Meta-layout fixtures from any HF LLaMA (the tests, the demo and the benchmark start from
an export of a known model): q/k rows go back to Meta's interleaved rotary order, every tensor is
split across `shards` model-parallel files along the axis converters/llama.toml names (replicated
ones are copied into each), and params.json is what Meta's reference code expects (vocab_size -1
as in the LLaMA-1/Llama-2 releases unless asked otherwise).

torch.save needs a shard's whole state dict at once, so each piece is first written to its own
scratch file; each shard is then saved from shared mappings of its pieces (page cache, dropped
after that shard), and the exporter never holds more than one source tensor in its own memory.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from ..errors import InputError, ShapeError, UnsupportedError
from ..io.output import Provenance, atomic_dir
from ..model import open_hf
from .meta_layout import meta_tensors, to_meta_rotary
from .meta_params import MetaParams, params_from_hf_config
from .tokenizer import TOKENIZER_MODEL

# HF buffers some old checkpoints saved that have no Meta counterpart (recomputed at load).
_HF_BUFFERS = ("rotary_emb.inv_freq",)


class _Staging:
    """Pieces written to one scratch file each, mapped back only when their shard is saved."""

    def __init__(self, folder: Path, shards: int):
        self.folder = folder
        folder.mkdir()
        self.pieces: list[dict[str, tuple[Path, tuple[int, ...], torch.dtype]]] = [{} for _ in range(shards)]

    def add(self, shard: int, name: str, piece: torch.Tensor) -> None:
        path = self.folder / f"{shard:02d}-{len(self.pieces[shard]):05d}"
        data = piece.contiguous().reshape(-1).view(torch.uint8).numpy()
        with open(path, "wb") as f:
            f.write(memoryview(data))
        self.pieces[shard][name] = (path, tuple(piece.shape), piece.dtype)

    def save(self, shard: int, target: Path) -> None:
        """torch.save the shard from shared file mappings (page cache, dropped right after)."""
        state = {name: torch.from_file(str(path), shared=True, size=_numel(shape), dtype=dtype).view(shape)
                 for name, (path, shape, dtype) in self.pieces[shard].items()}
        torch.save(state, target)
        del state
        for path, _, _ in self.pieces[shard].values():
            path.unlink()


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def export_meta(hf_dir: Path, out_dir: Path, shards: int = 1, *, vocab_size_in_params: bool = False,
                rope_freqs: bool = False, tokenizer: Path | None = None, force: bool = False) -> Path:
    """Write `out_dir` = params.json + consolidated.NN.pth (NN < shards) + tokenizer.model.

    vocab_size_in_params: state the vocabulary size (as Llama-3 does) instead of -1.
    rope_freqs: also save LLaMA-1's precomputed `rope.freqs` tensor in every shard.
    tokenizer: the SentencePiece model to ship (default: hf_dir/tokenizer.model).
    """
    model = open_hf(Path(hf_dir))
    source = f"{model.path / 'config.json'}"
    arch = model.arch
    if model.quantization:
        raise UnsupportedError(f"{source}: a quantized model cannot be exported to Meta's layout")
    if isinstance(shards, bool) or not isinstance(shards, int) or shards < 1:
        raise InputError(f"shards must be a positive integer, got {shards!r}")
    config = model.config
    reader = model.tensors
    embed_name = arch.globals["embed"]
    vocab = reader.info(embed_name).shape[0]
    params = params_from_hf_config(config, source)
    params["vocab_size"] = vocab if vocab_size_in_params else -1
    p = MetaParams.from_dict(params, model.path / "config.json")
    for key, value in (("num_attention_heads", p.n_heads), ("num_key_value_heads", p.n_kv_heads)):
        if value % shards:
            raise ShapeError(f"{source}: {shards} model-parallel shards do not divide {key} {value}")
    tokenizer = Path(tokenizer) if tokenizer else model.path / TOKENIZER_MODEL
    if not tokenizer.is_file():
        raise InputError(f"{tokenizer}: missing (Meta's layout ships the SentencePiece model)")

    tensors = meta_tensors(arch, p)
    sizes = p.sizes(vocab)
    tied = bool(config.get("tie_word_embeddings"))
    sources = {}
    for t in tensors:
        name = t.hf_name
        if name not in reader and t.role == "lm_head" and tied:
            name = embed_name
        full = t.full_shape(sizes)
        got = reader.info(name).shape
        if tuple(got) != full:
            raise ShapeError(f"{reader.info(name).file}: {name} is {list(got)}, the config implies {list(full)}")
        if t.dim is not None and full[t.dim] % shards:
            raise ShapeError(f"{source}: {name} has {full[t.dim]} along axis {t.dim}, which does not split "
                             f"into {shards} shards")
        sources[t.meta_name] = name
    leftover = sorted(set(reader.names()) - set(sources.values()))
    leftover = [n for n in leftover if not n.endswith(_HF_BUFFERS)]
    if leftover:
        raise UnsupportedError(f"{source}: tensor '{leftover[0]}' has no place in Meta's layout")

    prov = Provenance("export-meta", {"shards": shards, "vocab_size_in_params": vocab_size_in_params,
                                      "rope_freqs": rope_freqs},
                      [model.path] + ([tokenizer] if tokenizer.parent != model.path else []))
    with atomic_dir(Path(out_dir), prov, force=force) as art:
        staging = _Staging(art.path / ".staging", shards)
        layer = None
        for t in tensors:
            if t.layer != layer:
                reader.release()
                layer = t.layer
            w = reader.get(sources[t.meta_name])
            if t.rotary_heads:
                w = to_meta_rotary(w, t.rotary_heads)
            pieces = [w] * shards if t.dim is None else list(w.chunk(shards, dim=t.dim))
            for s, piece in enumerate(pieces):
                staging.add(s, t.meta_name, piece)
            del w, pieces
        reader.release()
        if rope_freqs:
            dtype = reader.info(sources[tensors[0].meta_name]).dtype
            freqs = 1.0 / (p.rope_theta ** (torch.arange(0, p.head_dim, 2).float() / p.head_dim))
            for s in range(shards):
                staging.add(s, "rope.freqs", freqs.to(dtype))
        for s in range(shards):
            staging.save(s, art.path / f"consolidated.{s:02d}.pth")
        staging.folder.rmdir()
        (art.path / "params.json").write_text(json.dumps(params) + "\n")
        shutil.copy2(tokenizer, art.path / TOKENIZER_MODEL)
    return Path(out_dir).resolve()
