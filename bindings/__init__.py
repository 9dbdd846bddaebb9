"""The Python side of the Python↔Go boundary (DESIGN §5).

Importing this package is cheap; the compiled extension and the Go library are
loaded by :func:`load` on first use, and the ABI version is checked there.
"""

from ._lib import load as load

__all__ = ["load"]
