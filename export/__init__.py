"""FiRST-Edge host toolchain (PyTorch): loading, routers, finetuning, export, bundles."""
from runtime.errors import quiet_host_libraries as _quiet

_quiet()
