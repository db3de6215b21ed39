"""The GLU's swish(gate) * up: a Triton forward and backward (``swish_product``) beside its reference."""

from kernels.swish_product.kernel import SwishProductTritonFunction, swish_product
from kernels.swish_product.naive import swish_product_reference

__all__ = ["SwishProductTritonFunction", "swish_product", "swish_product_reference"]
