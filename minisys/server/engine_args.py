"""The engine's command-line flags, derived from `EngineConfig`'s fields (vLLM's ``EngineArgs``, small).

Every field of `EngineConfig` becomes one flag, ``--field-name``; its help
is the field's ``metadata["help"]``, its choices ``metadata["choices"]``,
its type the field's annotation (``int | None`` -> ``int``), and a bool
field becomes a ``--name`` / ``--no-name`` pair. Nothing is re-declared
here, so a new engine knob appears on the command line by itself.

Invariants: a flag that is not given does not appear in the parsed
namespace (``default=SUPPRESS``), so `EngineConfig` applies its own default
(one default per knob, in one place); `engine_config_from_args` passes only
the flags given, and `EngineConfig` validates them once.
"""
from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from typing import Any, Union

from ..engine.config import EngineConfig


def flag(name: str, value: Any = None) -> str:
    """``max_num_seqs`` -> ``--max-num-seqs``; a bool field given False -> ``--no-...``."""
    return ("--no-" if value is False else "--") + name.replace("_", "-")


def _base_type(annotation: Any) -> type:
    """``int | None`` -> ``int``; ``bool`` -> ``bool``. Refuses unions of two real types."""
    if typing.get_origin(annotation) in (Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(args) != 1:
            raise TypeError(f"no command-line type for {annotation!r}")
        return args[0]
    return annotation


def _help(f: dataclasses.Field) -> str:
    """The field's help, with its default when it has one (argparse-escaped: % -> %%)."""
    text = f.metadata.get("help")
    if not text:
        raise ValueError(f"EngineConfig.{f.name} has no metadata['help']: every engine knob documents itself")
    if f.default is not None:
        shown = ("on" if f.default else "off") if isinstance(f.default, bool) else f.default
        text += f" (default: {shown})"
    return text.replace("%", "%%")


def add_engine_args(parser: argparse.ArgumentParser) -> None:
    """One flag per `EngineConfig` field, in field order, in an "engine" argument group."""
    group = parser.add_argument_group("engine", "EngineConfig fields (--engine llm only)")
    hints = typing.get_type_hints(EngineConfig)
    for f in dataclasses.fields(EngineConfig):
        kind = _base_type(hints[f.name])
        kw: dict[str, Any] = {"dest": f.name, "default": argparse.SUPPRESS, "help": _help(f)}
        if kind is bool:
            kw["action"] = argparse.BooleanOptionalAction
        else:
            kw["type"] = kind
            if "choices" in f.metadata:
                kw["choices"] = f.metadata["choices"]
        group.add_argument(flag(f.name), **kw)


def given_engine_args(args: argparse.Namespace) -> dict[str, Any]:
    """``{field: value}`` of the engine flags present on the command line."""
    return {f.name: getattr(args, f.name) for f in dataclasses.fields(EngineConfig) if hasattr(args, f.name)}


def engine_config_from_args(args: argparse.Namespace) -> EngineConfig:
    """The `EngineConfig` of the given flags, every other field at its default (validated there)."""
    return EngineConfig(**given_engine_args(args))
