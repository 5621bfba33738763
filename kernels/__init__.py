"""Triton kernels and the torch ops that wrap them."""
