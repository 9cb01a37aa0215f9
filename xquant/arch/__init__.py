"""Architecture registry: which tensor is which, described as data in converters/*.toml."""

from .registry import Architecture, for_config, get, known, load
from .specs import ExpertsSpec, GGUFSpec, GPTQSpec, MetaConvertSpec, MetaTensorSpec, QuantLayout, TransformersAs

__all__ = ["Architecture", "ExpertsSpec", "GGUFSpec", "GPTQSpec", "MetaConvertSpec", "MetaTensorSpec",
           "QuantLayout", "TransformersAs", "for_config", "get", "known", "load"]
