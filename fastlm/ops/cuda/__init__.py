"""C++/CUDA adapters, one module per op family with a csrc/<family>.cu: each registers the
extension's entry points as the ``cuda`` backend of its family's ops. Importing these modules
never builds or loads the extension: that happens on the first call."""

from fastlm.ops.cuda import int8, sampling  # noqa: F401
