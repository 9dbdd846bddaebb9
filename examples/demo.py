"""The README's demo: run examples/misbehave.py in a fake home, inside corral,
then check on the host that nothing it did got out."""

import hashlib
import os
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))


def digest(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def main():
    with tempfile.TemporaryDirectory(prefix="corral-demo-") as tmp:
        home = os.path.join(tmp, "home")
        for d in (".ssh", ".aws", "project"):
            os.makedirs(os.path.join(home, d))
        for rel, text in ((".ssh/id_ed25519", "-----BEGIN OPENSSH PRIVATE KEY----- (fake)\n"),
                          (".aws/credentials", "[default]\naws_secret_access_key = fake\n"),
                          (".bashrc", "# the demo user's .bashrc\n")):
            with open(os.path.join(home, rel), "w") as f:
                f.write(text)
        watched = [os.path.join(home, ".bashrc"), "/etc/hosts"]
        before = {p: digest(p) for p in watched}
        env = dict(os.environ, HOME=home, GITHUB_TOKEN="ghp_demo_not_a_real_token",
                   AWS_SECRET_ACCESS_KEY="fake-secret")
        argv = [sys.executable, "-m", "corral", "run", "--net", "none", "--",
                sys.executable, os.path.join(HERE, "misbehave.py")]
        print("$ corral run -- python examples/misbehave.py   (HOME=%s)\n" % home)
        code = subprocess.run(argv, env=env, cwd=os.path.join(home, "project")).returncode
        print("\ncorral exited with %d.  On the host afterwards:" % code)
        for path in watched:
            same = digest(path) == before[path]
            print("  %-10s %s" % ("unchanged" if same else "CHANGED!", path))
        leftover = os.path.exists("/usr/local/bin/backdoor")
        print("  %-10s /usr/local/bin/backdoor" % ("CREATED!" if leftover else "absent"))
        return 0 if all(digest(p) == before[p] for p in watched) and not leftover else 1


if __name__ == "__main__":
    sys.exit(main())
