"""Triton adapters, one module per op family: each registers the kernels of ``fastlm.kernels``
(kernels/ in a checkout) as the ``triton`` backend of its family's ops. Importing these modules
never imports triton: a kernel module is loaded on its first call."""

import importlib
import pkgutil

# Every adapter module of this package, imported (registered) when fastlm.ops is: a new
# family's adapter needs no line here.
for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")
