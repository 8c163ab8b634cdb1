"""forgekit: declarative, incremental builds of MTPLX-ready MLX models."""

__version__ = "0.1.0"
