"""corral: run untrusted commands in a rootless sandbox and see and decide what
they do on the network.

    import corral
    result = corral.run(["pip", "download", "six"], allow=["pypi.org"])

Everything public is re-exported here, lazily (PEP 562): stage-1 imports this
package on the start-up path, so importing it must not pull in trio, cffi,
pyroute2 or scapy.
"""

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
