"""Host-side warning silencing: torch, ExecuTorch, torchao and transformers are host libraries, so
this lives with the host toolchain, not in the device package ``runtime``."""
from __future__ import annotations


def quiet_host_libraries():
    """Silence import-time chatter of host libraries (torchao's optional CUDA kernels, pytree notices)."""
    import logging
    import os
    import warnings

    # deprecation notices from inside torch/executorch (e.g. pytree's LeafSpec, ~100 per ExecuTorch export)
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"(copyreg|torch|executorch|torchao)(\.|$)")
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*")
    logging.getLogger("torchao").setLevel(logging.ERROR)
    logging.getLogger("torch.utils._pytree").setLevel(logging.ERROR)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
