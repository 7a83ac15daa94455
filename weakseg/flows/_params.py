"""One typed parameter list per flow, shared by the CLI and the deployment.

A flow's signature *is* its parameter model: typed with ``Annotated[..., Field(...)]``
bounds and ``Literal`` choices, validated by Prefect for deployments and by
:func:`validate_params` here before the CLI starts any work. The signature is written once,
as a stub in :mod:`weakseg.flows.params` that imports neither torch nor Prefect; the flow
takes it over with :func:`with_parameters`, and the CLI reads the stub, so it answers
``--help`` and refuses bad options without loading the flow. A parameter that names an
input carries :data:`EXISTING`: the CLI refuses a local path that does not exist
(:func:`missing_inputs`) before any flow starts. Checks that compare two
parameters, which field bounds cannot express, are :func:`check_parameters`: the CLI runs
them in the same validation (exit 2, no flow run), and each flow runs them for deployments. :func:`add_flow_arguments`
turns the signature into ``argparse`` options, kebab-case for snake_case.
"""
from __future__ import annotations

import argparse
import glob
import inspect
import json
import os
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal, TypeVar, get_args, get_origin

import pydantic
from pydantic.fields import FieldInfo

__all__ = ["EXISTING", "Existing", "add_flow_arguments", "check_parameters", "flow_parameters", "missing_inputs",
           "validate_params", "with_parameters"]

F = TypeVar("F", bound=Callable[..., Any])


@dataclass(frozen=True)
class Existing:
    """``Annotated`` metadata of a parameter that names an input the run reads: the CLI refuses a
    local path (or a glob) that matches nothing, exit 2, before any server starts. Object-store URLs
    are left to the run. ``keywords``: values that are not paths (``auto``, ``none``...)."""

    keywords: tuple[str, ...] = ()


EXISTING = Existing()


def with_parameters(spec: Callable[..., Any]) -> Callable[[F], F]:
    """Give the decorated flow function the parameters of ``spec`` (annotations, defaults), so the
    stub in :mod:`weakseg.flows.params` is their one definition.

    The function names its parameters, in the stub's order, without types or defaults; a name
    missing, extra or out of order is a ``TypeError`` at import, so the two cannot drift apart.
    """
    signature = inspect.signature(spec)
    hints = typing.get_type_hints(spec, include_extras=True)

    def apply(fn: F) -> F:
        theirs = list(inspect.signature(fn).parameters)
        if theirs != list(signature.parameters):
            raise TypeError(f"{fn.__qualname__} names parameters {theirs}, but its parameter stub "
                            f"{spec.__module__}.{spec.__qualname__} defines {list(signature.parameters)}")
        params = list(signature.parameters.values())
        if any(p.kind is not inspect.Parameter.POSITIONAL_OR_KEYWORD for p in params):
            raise TypeError(f"{spec.__qualname__}: flow parameters are plain named parameters")
        fn.__annotations__ = {**{p.name: hints[p.name] for p in params if p.name in hints},
                              "return": fn.__annotations__.get("return", inspect.Signature.empty)}
        fn.__defaults__ = tuple(p.default for p in params if p.default is not inspect.Parameter.empty) or None
        return fn

    return apply


def _unwrap(annotation: Any) -> tuple[Any, FieldInfo | None]:
    if get_origin(annotation) is typing.Annotated:
        base, *meta = get_args(annotation)
        return base, next((m for m in meta if isinstance(m, FieldInfo)), None)
    return annotation, None


def _optional(base: Any) -> tuple[Any, bool]:
    if get_origin(base) in (typing.Union, types.UnionType):
        args = [a for a in get_args(base) if a is not type(None)]
        if len(args) == 1 and len(get_args(base)) == 2:
            return args[0], True
    return base, False


def flow_parameters(fn: Callable) -> list[inspect.Parameter]:
    fn = getattr(fn, "fn", fn)  # a Prefect Flow wraps the function
    hints = typing.get_type_hints(fn, include_extras=True)
    return [p.replace(annotation=hints.get(p.name, p.annotation)) for p in inspect.signature(fn).parameters.values()]


def _list_parser(item: type) -> Callable[[str], list]:
    def parse(text: str) -> list:
        return [item(x.strip()) for x in text.split(",") if x.strip()]

    return parse


def _or_none(kind: type) -> Callable[[str], Any]:
    """A parser of an optional number: ``none`` gives None (a default that is not None can be switched off)."""
    def parse(text: str) -> Any:
        return None if text.strip().lower() == "none" else kind(text)

    parse.__name__ = kind.__name__  # argparse names the type in its error message
    return parse


def add_flow_arguments(parser: argparse.ArgumentParser, fn: Callable) -> None:
    """Add one ``--kebab-name`` option per flow parameter."""
    for param in flow_parameters(fn):
        base, field = _unwrap(param.annotation)
        base, optional = _optional(base)
        flag = "--" + param.name.replace("_", "-")
        required = param.default is inspect.Parameter.empty
        help_text = (field.description if field else None) or ""
        kwargs: dict[str, Any] = {"dest": param.name, "help": help_text}
        if not required:
            kwargs["default"] = param.default
            if not (param.default is None or isinstance(param.default, bool) or param.default == ""):
                kwargs["help"] = f"{help_text} (default: {param.default})".strip()
        else:
            kwargs["required"] = True
        if base is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif get_origin(base) is Literal:
            kwargs["choices"] = list(get_args(base))
            kwargs["type"] = type(get_args(base)[0])
        elif base is dict or get_origin(base) is dict:
            kwargs["type"] = json.loads
            kwargs["metavar"] = "JSON"
        elif get_origin(base) in (list, tuple):
            item = get_args(base)[0] if get_args(base) else str
            kwargs["type"] = _list_parser(item)
            kwargs["metavar"] = "A,B,..."
        elif base in (int, float):
            kwargs["type"] = _or_none(base) if optional else base
        elif base is str:
            kwargs["type"] = base
        else:
            kwargs["type"] = str
        parser.add_argument(flag, **kwargs)


def validate_params(fn: Callable, values: dict[str, Any]) -> dict[str, Any]:
    """Check values against the annotations of a flow (or its parameter stub); raises ``ValueError``
    listing problems."""
    fields: dict[str, Any] = {}
    for param in flow_parameters(fn):
        default = ... if param.default is inspect.Parameter.empty else param.default
        fields[param.name] = (param.annotation, default)
    name = getattr(fn, "name", None) or getattr(fn, "__name__", "flow")
    model = pydantic.create_model(f"{name}-parameters", **fields)
    try:
        checked = model(**values)
    except pydantic.ValidationError as err:
        problems = "; ".join(f"--{'.'.join(map(str, e['loc'])).replace('_', '-')}: {e['msg']}" for e in err.errors())
        raise ValueError(problems) from None
    result = {name: getattr(checked, name) for name in fields}
    check_parameters(result)
    return result


def _local_path(value: str) -> str | None:
    """The local path a URL names (plain or ``file://``); None for any other scheme."""
    if value.startswith("file://"):
        return value[len("file://"):]
    return None if "://" in value else value


def missing_inputs(fn: Callable, values: Mapping[str, Any]) -> list[str]:
    """The :data:`EXISTING` parameters whose value is a local path (or glob) that matches nothing."""
    problems = []
    for param in flow_parameters(fn):
        marker = next((m for m in get_args(param.annotation)[1:] if isinstance(m, Existing)), None) \
            if get_origin(param.annotation) is typing.Annotated else None
        value = values.get(param.name)
        if marker is None or not isinstance(value, str) or not value or value in marker.keywords:
            continue
        path = _local_path(value)
        if path is None:
            continue
        flag = "--" + param.name.replace("_", "-")
        if glob.has_magic(path):
            if not glob.glob(path, recursive=True):
                problems.append(f"{flag}: {value} matches no file")
        elif not os.path.exists(path):
            problems.append(f"{flag}: {value} does not exist")
    return problems


def check_parameters(values: Mapping[str, Any]) -> None:
    """The checks that compare two parameters, for whichever of them ``values`` holds;
    raises ``ValueError`` listing the problems."""
    problems = []
    if {"min_side", "max_side"} <= values.keys() and (values["min_side"] or 0) > values["max_side"]:
        problems.append(f"min_side {values['min_side']} is over max_side {values['max_side']}")
    if {"mean", "std"} <= values.keys():
        mean, std = values["mean"] or (), values["std"] or ()
        if len(mean) not in (0, 3) or len(std) not in (0, 3) or bool(mean) != bool(std):
            problems.append("--mean and --std take three values each, or neither")
    if "tta" in values:
        from weakseg.tasks.segment.tta import DEFAULT_TTA, TTAError, parse_tta, resolve_tta

        try:
            parse_tta(resolve_tta(values["tta"], DEFAULT_TTA))  # "auto" is resolved with the model later
        except TTAError as err:
            problems.append(f"--tta: {err}")
    steps = {k.removesuffix("_options"): v for k, v in values.items() if k.endswith("_options") and v}
    if steps:  # life-cycle: each step's options, named as that step's command takes them
        from weakseg.flows.params.life_cycle import option_problems

        problems += option_problems(steps)
    if problems:
        raise ValueError("; ".join(problems))
