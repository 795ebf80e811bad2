"""Kernel packages that are not part of the C++ extension (currently: triton/). Imported lazily by backends."""
