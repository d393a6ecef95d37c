"""The engine's host side (sequence, block manager, scheduler) must never import JAX."""
import subprocess
import sys


def test_host_side_modules_do_not_import_jax():
    code = (
        "import sys\n"
        "import aphrodite_jax.engine.sequence, aphrodite_jax.engine.block_manager\n"
        "import aphrodite_jax.engine.scheduler, aphrodite_jax.engine.beam_search\n"
        "from aphrodite_jax.config import CacheConfig, SchedulerConfig\n"
        "from aphrodite_jax.engine.scheduler import Scheduler\n"
        "Scheduler(SchedulerConfig(), CacheConfig(), 4, 0, 64).schedule()\n"
        "bad = sorted(m for m in sys.modules if m == 'jax' or m.startswith(('jax.', 'jaxlib', 'flax')))\n"
        "print(bad)\n"
        "sys.exit(1 if bad else 0)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"JAX imported by the host side: {proc.stdout} {proc.stderr}"
