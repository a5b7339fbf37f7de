"""vllm-quick: the QUICK W4A16 kernel for AWQ checkpoints, as a vLLM quantization plugin.

``register()`` is the ``vllm.general_plugins`` entry point: vLLM calls it in every process
(API server, engine core, workers). It only imports the config module, whose decorator registers
the ``quick`` method; importing twice is harmless.
"""

__version__ = "0.1.0"


def register() -> None:
    """Register the ``quick`` quantization method with vLLM (idempotent, cheap)."""
    from vllm_quick import config  # noqa: F401  (registration happens on import)
