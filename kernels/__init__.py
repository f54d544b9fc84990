"""Triton kernels for GPT-2, one fused operation per module; the torch backend's ops; the reference math.

Nothing is imported here on purpose: whether triton builds the kernels for the GPU or for its CPU
interpreter is fixed when a kernel module is first imported, and `backend.Backend.ops` decides that.
"""
