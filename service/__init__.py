"""logand service: reward models behind HTTP, with transformed and AND-aggregated utilities."""

__version__ = "0.1.0"
