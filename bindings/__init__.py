"""pccl.bindings: the only code that imports torch (tensor adapters, DiLoCo, FSDP helpers)."""
