"""Load the cffi extension and check that the Go library matches it."""

_loaded = None


def load():
    """Return ``(ffi, lib)``, loading and checking the library once.

    Raises ImportError with the fix when the extension is missing or was built
    against another version of netstack.h than the library it found.
    """
    global _loaded
    if _loaded is not None:
        return _loaded
    try:
        from ._netstack import ffi, lib
    except ImportError as exc:
        raise ImportError(
            "corral: the netstack extension is not built (%s). "
            "Fix: install corral with `pip install .` (or `pip install -e .`) "
            "from a checkout, which builds netstack_go/ with Go." % exc
        ) from exc
    have = lib.corral_abi_version()
    want = lib.CORRAL_NET_ABI_VERSION
    if have != want:
        raise ImportError(
            "corral: libcorralnet.so speaks netstack ABI %d but the extension "
            "was built for ABI %d. Fix: rebuild both together with "
            "`pip install --force-reinstall --no-deps .`." % (have, want)
        )
    _loaded = (ffi, lib)
    return _loaded
