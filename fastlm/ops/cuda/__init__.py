"""C++/CUDA adapters, one module per op family with a csrc/<family>.cu: each registers the
extension's entry points as the ``cuda`` backend of its family's ops. Importing these modules
never builds or loads the extension: that happens on the first call."""

import importlib
import pkgutil

# Every adapter module of this package, imported (registered) when fastlm.ops is: a new
# family's adapter needs no line here.
for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")
