"""``vllm-quick`` command line: one sub-command per module.

Each sub-command lives in its own module, which provides ``add_arguments(parser)`` and
``run(args) -> int``; this file only wires them together.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# sub-command -> (module, one-line help)
COMMANDS = {
    "quantize": ("vllm_quick.quantize", "quantise a Hugging Face fp16/bf16 checkpoint to AWQ or QUICK"),
    "make-demo": ("vllm_quick.demo_model", "build the tiny bundled demo model (offline, seconds)"),
    "dequantize": ("vllm_quick.quantize", None),  # registered by quantize.add_dequantize_arguments
    "demo": ("vllm_quick.serve_demo", "build the demo model, serve it with --quantization quick, ask it once"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vllm-quick", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (module_name, help_text) in COMMANDS.items():
        module = importlib.import_module(module_name)
        adder = getattr(module, f"add_{name.replace('-', '_')}_arguments", None)
        if adder is None:
            adder = module.add_arguments
        p = sub.add_parser(name, help=help_text or getattr(module, "DEQUANTIZE_HELP", None))
        adder(p)
        runner = getattr(module, f"run_{name.replace('-', '_')}", None) or module.run
        p.set_defaults(_run=runner)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args._run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
