import os

from hypothesis import HealthCheck, settings

settings.register_profile(
    "qkv",
    deadline=None,
    derandomize=bool(os.environ.get("CI")),
    suppress_health_check=[HealthCheck.too_slow],
)
settings.load_profile("qkv")
