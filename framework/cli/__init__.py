"""The `diffstage` command.

    diffstage generate [HYDRA OVERRIDES...]   generate an image (a Hydra app: -m, --cfg job, ... work)
    diffstage sheet [HYDRA OVERRIDES...]      a labelled contact sheet of the model's example prompts
    diffstage serve [HYDRA OVERRIDES...]      an OpenAI-compatible server (serve.* settings: conf/serve.yaml)
    diffstage validate NAME_OR_PATH          check a model YAML without loading weights (--memory: per stage)
    diffstage graph NAME_OR_PATH             print its stage graph as Mermaid text (--png PATH: with Graphviz)
    diffstage schema                          print the JSON Schema of model YAMLs (for editors)
    diffstage models                          list the shipped model YAMLs

Errors in user input print a message and exit 2; set DIFFSTAGE_DEBUG=1 (or
pass --debug to validate) to see the traceback instead.

This module is the entry point and the dispatch; each command lives in the module of its job (generate.py:
generate and sheet, serve.py: serve, hydra_app.py: their Hydra plumbing, inspection.py: validate, graph, schema, models)."""
from __future__ import annotations

import importlib
import os
import sys

from .. import __version__
from ..console import guarded_stdout, say
from ..errors import DiffstageError, did_you_mean
from .exits import fail

USAGE = """usage: diffstage <command> [args]

commands:
  generate [overrides]   generate an image; Hydra overrides such as prompt="a red fox" seed=0
                         model=NAME_OR_YAML model_path=DIR sampling.num_inference_steps=4 (-m, --cfg job, --help)
  sheet [overrides]      a labelled contact sheet: one image per example prompt of the model (or
                         prompts=[...]) and seed (seeds=[0,1]); same overrides as generate
  serve [overrides]      an OpenAI-compatible HTTP server (Images API, video jobs): serve.port=8000
                         serve.models=[NAME,...] serve.max_batch=8 serve.api_key=KEY (needs the serve extra)
  validate NAME_OR_PATH  check a model YAML (schema + stage contracts) without loading weights
                         (--memory [overrides]: the memory each stage needs for that run, from the
                         checkpoint's safetensors headers: model_path=DIR sampling.height=1024 runtime.quantize=int8)
  graph NAME_OR_PATH     its stage graph: the Req fields flowing between stages, as Mermaid text
                         (--png PATH draws it with Graphviz: pip install graphviz, plus its dot program)
  schema                 the JSON Schema of model YAMLs, for editors (--output PATH writes it to a new file)
  models                 list the shipped model YAMLs

Set DIFFSTAGE_DEBUG=1 to see tracebacks.
"""


# command -> (module of cli/, function): each command imports only its own module, when it runs.
COMMANDS = {"generate": ("generate", "generate_command"), "sheet": ("generate", "sheet_command"),
            "validate": ("inspection", "validate_command"), "models": ("inspection", "models_command"),
            "graph": ("inspection", "graph_command"), "schema": ("inspection", "schema_command"),
            "serve": ("serve", "serve_command")}


def main(argv: list[str] | None = None) -> None:
    try:
        with guarded_stdout():
            _dispatch(list(sys.argv[1:] if argv is None else argv))
    except DiffstageError as e:  # a report that could not be written to stdout (console)
        fail(e)
    except BrokenPipeError:  # `diffstage models | head`: the reader left; not an error of ours
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(1)


def _dispatch(argv: list[str]) -> None:
    if not argv or argv[0] in ("-h", "--help", "help"):
        say(USAGE, end="")
        sys.exit(0 if argv else 2)
    if argv[0] == "--version":
        say(f"diffstage {__version__}")
        return
    if argv[0] not in COMMANDS:
        hint = did_you_mean(argv[0], COMMANDS)
        print(f"error: unknown command '{argv[0]}'" + (f"; {hint}" if hint else "") + "\n\n" + USAGE,
              file=sys.stderr, end="")
        sys.exit(2)
    module, function = COMMANDS[argv[0]]
    getattr(importlib.import_module(f".{module}", __package__), function)(argv[1:])
