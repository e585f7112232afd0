"""The fast path: optimised attention backends behind the same interface as the reference.

`registry.get_attention_backend(name, device)` builds one by name: `torch` (vectorised, CPU and
CUDA, in `torch_native.py`), `flash-attn` and `xformers` (CUDA kernels, imported lazily), or
`reference`; `auto` picks the fastest available.
"""
