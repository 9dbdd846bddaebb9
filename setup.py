"""Build steps that pyproject.toml cannot express declaratively.

1. `go build -buildmode=c-shared` turns netstack_go/ into libcorralnet.so.
2. cffi compiles bindings/_build.py (out-of-line, API mode) against
   bindings/netstack.h and links it to that library with an $ORIGIN rpath.
3. The library is copied next to the extension, so both normal and editable
   installs find it without LD_LIBRARY_PATH.
"""

import os
import shutil
import subprocess

from setuptools import setup
from setuptools.command.build_ext import build_ext

HERE = os.path.dirname(os.path.abspath(__file__))
GO_LIB = "libcorralnet.so"


class build_go_then_cffi(build_ext):
    def run(self):
        go_out = os.path.abspath(os.path.join(self.build_temp, "go"))
        os.makedirs(go_out, exist_ok=True)
        self._go_build(os.path.join(go_out, GO_LIB))
        for ext in self.extensions:
            ext.library_dirs.append(go_out)
        super().run()
        dest = os.path.dirname(self.get_ext_fullpath("corral.bindings._netstack"))
        os.makedirs(dest, exist_ok=True)
        shutil.copy2(os.path.join(go_out, GO_LIB), os.path.join(dest, GO_LIB))

    def _go_build(self, out):
        go = shutil.which("go") or "/usr/local/go/bin/go"
        if not os.path.exists(go):
            raise SystemExit(
                "corral: building needs the Go toolchain (go >= 1.22) on PATH. "
                "Fix: install Go from your distribution or go.dev, then rerun pip install."
            )
        env = dict(os.environ, CGO_ENABLED="1")
        env.setdefault("GOFLAGS", "-mod=readonly")
        cmd = [go, "build", "-buildmode=c-shared", "-trimpath", "-o", out, "."]
        self.announce("building %s: %s" % (GO_LIB, " ".join(cmd)), level=2)
        subprocess.run(cmd, cwd=os.path.join(HERE, "netstack_go"), env=env, check=True)
        header = os.path.splitext(out)[0] + ".h"  # cgo's generated header: unused
        if os.path.exists(header):
            os.unlink(header)


setup(
    cffi_modules=["bindings/_build.py:ffibuilder"],
    cmdclass={"build_ext": build_go_then_cffi},
)
