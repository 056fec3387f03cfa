"""FiRST-Edge host toolchain (PyTorch): loading, routers, finetuning, export, bundles."""
from .quiet import quiet_host_libraries

quiet_host_libraries()
