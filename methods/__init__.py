"""Built-in aggregation methods, one module each. Importing this package registers them."""

from mtl_opt.methods.linear_scalarization import LinearScalarization

__all__ = ["LinearScalarization"]
