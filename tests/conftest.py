"""Shared pytest fixtures.

* ``vllm_dist``: vLLM's layers read the tensor-parallel group when they are built, so tests that
  build real vLLM linear layers first set up a one-process ``gloo`` group on the CPU (and a default
  vLLM config), once per session.
* ``fake_tp``: pretend to be rank ``r`` of a tensor-parallel group of ``size`` ranks while building
  and loading a layer, so TP sharding can be checked in one process (collectives are never called:
  the tests call ``quant_method.apply`` directly).
* ``demo_model_dir``: the tiny demo model (AWQ), built once per session.
* ``demo_server``: one ``vllm serve --config serving_configs/cpu_demo.yaml`` of the demo model,
  shared by tests/test_load_tests.py and tests/test_malformed_requests.py (started on first use,
  after the e2e tests' own servers are gone, and stopped when the session ends).
"""

from __future__ import annotations

import contextlib
import tempfile
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def vllm_dist():
    from vllm.config import VllmConfig, set_current_vllm_config
    from vllm.distributed import init_distributed_environment, initialize_model_parallel
    from vllm.distributed.parallel_state import model_parallel_is_initialized

    import vllm_quick

    vllm_quick.register()
    with tempfile.TemporaryDirectory() as tmp, set_current_vllm_config(VllmConfig()):
        if not model_parallel_is_initialized():
            init_distributed_environment(
                world_size=1,
                rank=0,
                local_rank=0,
                distributed_init_method=f"file://{tmp}/dist_init",
                backend="gloo",
            )
            initialize_model_parallel(1)
        yield


@pytest.fixture
def fake_tp(monkeypatch, vllm_dist):
    """``with fake_tp(rank, size): build layer; load weights`` - see the module docstring."""
    import vllm.model_executor.layers.linear as vllm_linear
    import vllm.model_executor.parameter as vllm_parameter

    @contextlib.contextmanager
    def use(rank: int, size: int):
        with monkeypatch.context() as m:
            for module in (vllm_linear, vllm_parameter):
                m.setattr(module, "get_tensor_model_parallel_rank", lambda: rank, raising=True)
                m.setattr(module, "get_tensor_model_parallel_world_size", lambda: size, raising=True)
            yield

    return use


@pytest.fixture(scope="session")
def demo_model_dir(tmp_path_factory) -> Path:
    from vllm_quick.demo_model import make_demo_model

    return make_demo_model(tmp_path_factory.mktemp("demo") / "quick-demo-awq", fmt="awq", group_size=64)


@pytest.fixture(scope="session")
def demo_server(demo_model_dir, tmp_path_factory):
    """One CPU demo server for the load-test and malformed-request tests: ``vllm serve <demo
    model> --config serving_configs/cpu_demo.yaml`` on a free loopback port, started the way
    ``load_tests/run_load.py --serve`` starts servers, stopped (its whole process group) when the
    session ends. Yields a ``load_tests.run_load.Running`` (``url``, ``server``, ``log_path``)."""
    from load_tests.run_load import running, target_from_config

    config = Path(__file__).resolve().parents[1] / "serving_configs" / "cpu_demo.yaml"
    target = target_from_config(str(config), None, str(demo_model_dir))
    with running(target, tmp_path_factory.mktemp("demo_server"), startup_timeout=600) as live:
        yield live
