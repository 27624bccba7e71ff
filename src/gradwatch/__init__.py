"""gradwatch: a training pipeline that makes backpropagation visible."""

from gradwatch.config.resolvers import register_resolvers

register_resolvers()

__version__ = "0.1.0"
