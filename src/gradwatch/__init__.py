"""gradwatch: a training pipeline that makes backpropagation visible.

`from gradwatch import GradientTelemetry` gives the telemetry callback for any Lightning project;
it is imported on first use, so `import gradwatch` stays free of Lightning and torch
(scripts/summarize.py relies on it).
"""

from gradwatch.config.resolvers import register_resolvers

register_resolvers()

__version__ = "0.1.0"
__all__ = ["GradientTelemetry", "__version__"]


def __getattr__(name: str):
    if name == "GradientTelemetry":
        from gradwatch.telemetry.callback import GradientTelemetry

        return GradientTelemetry
    raise AttributeError(f"module 'gradwatch' has no attribute {name!r}")
