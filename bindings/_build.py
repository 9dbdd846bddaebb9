"""cffi out-of-line API-mode build of corral.bindings._netstack.

The cdef is netstack.h itself, minus preprocessor lines: one header serves cgo
(#include) and cffi (cdef), so the two sides cannot drift apart.
"""

import os
import re

from cffi import FFI

HERE = os.path.dirname(os.path.abspath(__file__))
HEADER = os.path.join(HERE, "netstack.h")


def _cdef_text(path):
    # Integer macros become `#define NAME ...` so that cffi takes their values
    # from the compiled header instead of parsing C expressions.
    keep = []
    for line in open(path, encoding="utf-8"):
        match = re.match(r"\s*#define\s+(CORRAL_[A-Z0-9_]+)\s+-?\d+", line)
        if match:
            keep.append("#define %s ...\n" % match.group(1))
        elif not line.lstrip().startswith("#"):
            keep.append(line)
    return "".join(keep)


ffibuilder = FFI()
ffibuilder.cdef(_cdef_text(HEADER))
ffibuilder.set_source(
    "corral.bindings._netstack",
    '#include "netstack.h"',
    include_dirs=[HERE],
    libraries=["corralnet"],
    extra_link_args=["-Wl,-rpath,$ORIGIN"],
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
