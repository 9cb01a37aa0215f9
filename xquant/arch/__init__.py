"""Architecture registry: which tensor is which, described as data in converters/*.toml."""

from .registry import Architecture, for_config, get, known

__all__ = ["Architecture", "for_config", "get", "known"]
