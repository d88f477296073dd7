"""The commands that read a model YAML without loading weights (validate, graph, schema) and `diffstage models`."""
from __future__ import annotations

import argparse
import os
from pathlib import Path

from ..model_check import check_model
from ..console import say
from ..errors import DiffstageError
from ..graph import render_png, stage_graph, to_mermaid
from ..model_yaml import describe_models
from ..output_files import write_new
from ..schema import model_schema_json
from .exits import fail


def validate_command(argv: list[str]) -> None:
    p = argparse.ArgumentParser(prog="diffstage validate", description="Check a model YAML without loading weights.")
    p.add_argument("model", help="shipped model name or path to a model YAML")
    p.add_argument("--allow", action="append", default=[], metavar="PREFIX",
                   help="extra module prefix dotted paths may import from (repeatable)")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    p.add_argument("--memory", action="store_true", help="also print the memory the run needs, per stage, "
                   "without loading weights (the request and checkpoint from the overrides)")
    p.add_argument("overrides", nargs="*", help="with --memory: run config overrides, as for generate "
                   "(model_path=DIR sampling.height=1024 runtime.quantize=int8 runtime.offload=model lora=[...])")
    args = p.parse_intermixed_args(argv)  # `validate NAME --memory model_path=...`: options between positionals
    if args.debug:
        os.environ["DIFFSTAGE_DEBUG"] = "1"
    if args.overrides and not args.memory:
        p.error(f"overrides ({' '.join(args.overrides)}) are only taken with --memory")
    try:
        checked = check_model(args.model, allowlist=args.allow)
        memory = _memory_report(args, checked) if args.memory else ""
    except DiffstageError as e:
        fail(e)
        return
    spec = checked.spec
    say(f"OK {checked.file}: model '{spec.name}' ({spec.pipeline_name}, {spec.task.value}), "
        f"{len(spec.stages)} stages, {len(spec.modules)} modules\n" + "".join(
            f"  stages[{p.index}] {p.cls.__name__}: reads {sorted(p.contract.reads)}"
            f"{_optional(p.contract.optional_reads - p.contract.reads, checked)} -> writes "
            f"{sorted(p.contract.writes)}{_optional(p.contract.optional_writes - p.contract.writes, checked)}\n"
            for p in checked.plan) + memory, end="")


def _memory_report(args, checked) -> str:
    """`validate --memory`: the estimate of memory_plan.py for the run the overrides describe."""
    from ..builder import compose_config, plan_from_config
    from ..memory_plan import estimate_memory, format_memory_plan

    allow = [f"allowlist=[{','.join(args.allow)}]"] if args.allow else []
    cfg = compose_config([*allow, *args.overrides, f"model={args.model}"])
    return format_memory_plan(estimate_memory(plan_from_config(cfg, checked)))


def _optional(fields, checked) -> str:
    """` (+ optional [...])`: the fields a stage reads or writes only when they are set (or in some cases),
    among this model's fields."""
    known = sorted(f for f in fields if f in checked.req_cls.field_names())
    return f" (+ optional {known})" if known else ""


def graph_command(argv: list[str]) -> None:
    p = argparse.ArgumentParser(prog="diffstage graph", description="Print a model's stage graph (the Req fields "
                                "flowing between its stages) as Mermaid text, without loading weights.")
    p.add_argument("model", help="shipped model name or path to a model YAML")
    p.add_argument("--allow", action="append", default=[], metavar="PREFIX",
                   help="extra module prefix dotted paths may import from (repeatable)")
    p.add_argument("--png", metavar="PATH", help="draw it into a new PNG file instead (needs the graphviz "
                                                 "package and Graphviz's dot program)")
    args = p.parse_args(argv)
    try:
        graph = stage_graph(check_model(args.model, allowlist=args.allow))
        if args.png is None:
            say(to_mermaid(graph), end="")
            return
        path = _write_once(args.png, lambda: render_png(graph))
    except DiffstageError as e:
        fail(e)
        return
    say(path.resolve())


def schema_command(argv: list[str]) -> None:
    p = argparse.ArgumentParser(prog="diffstage schema", description="Print the JSON Schema (draft 2020-12) of "
                                "model YAMLs, for editors: `# yaml-language-server: $schema=PATH` in a YAML.")
    p.add_argument("--output", metavar="PATH", help="write it into a new file instead (an existing one is refused)")
    args = p.parse_args(argv)
    text = model_schema_json()
    if args.output is None:
        say(text, end="")
        return
    try:
        path = _write_once(args.output, text.encode)
    except DiffstageError as e:
        fail(e)
        return
    say(path.resolve())


def _write_once(path: str, make) -> Path:
    """Write the bytes `make()` returns into the new file `path`, atomically; an existing file or folder of
    that name is refused, not replaced (outputs are never overwritten)."""
    return write_new(path, lambda tmp: Path(tmp).write_bytes(make()), numbered=False)


def models_command(argv: list[str]) -> None:
    p = argparse.ArgumentParser(prog="diffstage models", description="List the shipped model YAMLs.")
    p.parse_args(argv)
    rows = describe_models()
    width = max((len(n) for n, _, _ in rows), default=0)
    say("".join(f"{name.ljust(width)}  {task.ljust(4)}  {desc}\n" for name, task, desc in rows), end="")
