"""``vllm-quick`` command line: one sub-command per module.

Each sub-command's module provides ``add_arguments(parser)`` and ``run(args) -> int``; this file
only wires them together (modules are imported lazily, so ``--help`` stays fast).
"""

from __future__ import annotations

import argparse
import importlib
import sys

# sub-command -> (module, one-line help)
COMMANDS = {
    "quantize": ("vllm_quick.quantize", "quantise a Hugging Face fp16/bf16 checkpoint to AWQ or QUICK format"),
    "dequantize": ("vllm_quick.dequantize", "write an AWQ/QUICK checkpoint back as a plain unquantised one"),
    "make-demo": ("vllm_quick.demo_model", "build the tiny bundled demo model (offline, seconds)"),
    "demo": ("vllm_quick.serve_demo", "build the demo model, serve it with --quantization quick, ask it once"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vllm-quick", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (module_name, help_text) in COMMANDS.items():
        module = importlib.import_module(module_name)
        p = sub.add_parser(name, help=help_text, description=help_text)
        module.add_arguments(p)
        p.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args._run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
