"""Triton kernels, one op per file: a private `_name_kernel` and a launcher that checks its inputs.

Each kernel's pure-torch reference lives in mixquant_serve/quant or mixquant_serve/engine. This
package imports only torch and triton; import the op's module directly (nothing is imported here,
so importing `kernels` does not import triton).
"""
