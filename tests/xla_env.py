"""XLA_FLAGS for the suite's subprocesses: the parent's flags (the cheap CPU code generation set in
conftest.py) without any host device count, plus ``devices`` simulated CPU devices when given. A child whose
results are compared bit for bit with the parent's must compile with the parent's flags."""

import os

_COUNT = "--xla_force_host_platform_device_count"


def child_flags(devices: int | str | None = None) -> str:
    flags = [f for f in os.environ.get("XLA_FLAGS", "").split() if not f.startswith(_COUNT)]
    return " ".join(flags + ([f"{_COUNT}={devices}"] if devices is not None else []))
