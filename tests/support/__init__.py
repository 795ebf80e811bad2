"""Helpers the test modules share: the float64 oracle and the tolerance rule (oracle.py), the generated case matrix
(cases.py), the CUDA toolchain and SASS readers (toolchain.py). Test modules import from here, never from each
other."""
