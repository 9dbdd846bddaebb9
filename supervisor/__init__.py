"""corral: run untrusted commands in a rootless sandbox and see and decide what
they do on the network.

    import corral
    result = corral.run(["pip", "download", "six"], allow=["pypi.org"])

Everything public is re-exported here, lazily (PEP 562): stage-1 imports this
package on the start-up path, so importing it must not pull in trio, cffi,
pyroute2 or scapy.
"""

import sys

__version__ = "0.1.0"

_EXPORTS = {
    # api
    "run": "api",
    "open_sandbox": "api",
    "enter": "api",
    "Sandbox": "api",
    "Process": "api",
    # data
    "Config": "config",
    "Result": "launch",
    # errors
    "CorralError": "errors",
    "ConfigError": "errors",
    "SandboxError": "errors",
    "NetstackError": "errors",
    "PolicyError": "errors",
    # policy
    "Verdict": "policy",
    "ALLOW": "policy",
    "deny": "policy",
    "ConnectRequest": "policy",
    "DnsQuery": "policy",
}

# Public submodules, loaded on first use: corral.aio (the API for asyncio programs).
_SUBMODULES = ("aio",)

__all__ = sorted(_EXPORTS) + ["__version__", *_SUBMODULES]


def __getattr__(name):
    module = _EXPORTS.get(name)
    if module is None and name not in _SUBMODULES:
        raise AttributeError("module 'corral' has no attribute %r" % name)
    import importlib

    if module is None:
        value = importlib.import_module("." + name, __name__)
        globals()[name] = value
        return value
    value = getattr(importlib.import_module("." + module, __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return __all__


class _TrioFindsPthreadBySoname:
    """trio looks libpthread up with ``ctypes.util.find_library`` when it is first
    imported, which runs ``/sbin/ldconfig -p`` (a fork and exec: 10 ms or more of
    every filtered start-up, issue 11).  Just before that first import, this
    answers that one lookup by soname, as the dynamic loader resolves it (glibc
    keeps a ``libpthread.so.0`` stub; elsewhere trio falls back to libc), and
    puts the original back.  A meta-path hook that finds nothing: importing
    corral costs nothing more, ctypes is only loaded when trio is."""

    @classmethod
    def find_spec(cls, name, path=None, target=None):
        if name == "trio":
            sys.meta_path.remove(cls)
            cls.install()
        return None

    @staticmethod
    def install():
        import ctypes
        import ctypes.util

        original = ctypes.util.find_library

        def find_library(name):
            if name != "pthread":
                return original(name)
            ctypes.util.find_library = original
            try:
                ctypes.CDLL("libpthread.so.0")
            except OSError:
                return None
            return "libpthread.so.0"

        ctypes.util.find_library = find_library


if "trio" not in sys.modules:
    sys.meta_path.insert(0, _TrioFindsPthreadBySoname)
