"""Test-wide setup: 4 virtual CPU devices and exact fp32 matmuls, fixed before jax is imported."""
import os

if "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def default_llm():
    """One engine on the default model with the suite's common shapes (see engine_utils.ENGINE_KW),
    shared by every test that needs no special engine settings."""
    from engine_utils import make_llm

    return make_llm()
