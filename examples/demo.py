"""The README's demo: audit a misbehaving installer, then run it under the
allowlist the audit suggested.  Second act: audit two versions of a package
and show what the new one does that the old one did not (`corral diff`).

Everything happens offline in a private "world" (corral.world): a network
namespace whose only addresses are documentation ones, with its own DNS, HTTP
and TLS servers.  The installer attacks a throw-away home with fake secrets,
never yours.
"""

import hashlib
import os
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
from corral.world import World


def digest(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def fake_home(root):
    home = os.path.join(root, "home")
    for rel, text in ((".ssh/id_ed25519", "-----BEGIN OPENSSH PRIVATE KEY----- (fake)\n"),
                      (".aws/credentials", "[default]\naws_secret_access_key = fake\n"),
                      (".bashrc", "# the demo user's .bashrc\n")):
        path = os.path.join(home, rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            f.write(text)
    project = os.path.join(home, "project")
    os.makedirs(project)
    return home, project


def banner(text):
    print("\n\033[1m$ %s\033[0m" % text, flush=True)


NEXT_STEPS = """
Next, on your own machine (corral denies the network by default, so this sends nothing out):
  .venv/bin/corral run -- curl -sS https://example.com        # blocked, and corral says how to allow it
  .venv/bin/corral audit -- sh -c 'echo hi > ~/.bashrc'       # the write stays in the sandbox, the audit flags it
  . .venv/bin/activate                                        # puts `corral` on your PATH
"""


def main():
    print("starting a private offline world (documentation addresses, its own DNS and web "
          "servers)...", flush=True)
    with tempfile.TemporaryDirectory(prefix="corral-demo-") as tmp, World.start() as world:
        world.add_record("webhook.site", "A", "203.0.113.2")
        (world.docroot / "simple" / "left-pad-ng").mkdir(parents=True, exist_ok=True)
        (world.docroot / "simple" / "left-pad-ng" / "index.html").write_text("<a>left-pad-ng-1.0.0</a>\n")
        (world.docroot / "stage2.sh").write_text("#!/bin/sh\necho pwned\n")
        home, project = fake_home(tmp)
        report, allowlist = os.path.join(tmp, "report.json"), os.path.join(tmp, "allow.txt")
        env = dict(os.environ, HOME=home, GITHUB_TOKEN="ghp_demo_not_a_real_token",
                   AWS_SECRET_ACCESS_KEY="fake-secret")
        installer = [sys.executable, os.path.join(HERE, "installer.py")]
        corral = [sys.executable, "-m", "corral"]
        bashrc = digest(os.path.join(home, ".bashrc"))

        banner("corral audit --report report.json --suggest allow.txt -- python installer.py")
        world.run(corral + ["audit", "--report", report, "--suggest", allowlist, "--"] + installer,
                  env=env, cwd=project, timeout=120)

        banner("cat allow.txt")
        with open(allowlist) as f:
            suggested = f.read()
        sys.stdout.write(suggested)

        # A person reviews the suggestion: only the package index is trusted.
        banner("grep '^pypi.org' allow.txt > reviewed.txt")
        reviewed = os.path.join(tmp, "reviewed.txt")
        with open(reviewed, "w") as f:
            f.writelines(line + "\n" for line in suggested.splitlines() if line.startswith("pypi.org"))
        allowlist = reviewed

        banner("corral run --allow-file reviewed.txt -- python installer.py")
        code = world.run(corral + ["run", "--allow-file", allowlist, "--"] + installer,
                         env=env, cwd=project, timeout=120).returncode

        print("\nOn the host afterwards:")
        same = digest(os.path.join(home, ".bashrc")) == bashrc
        print("  %-9s ~/.bashrc" % ("unchanged" if same else "CHANGED!"))
        leaked = os.path.exists("/etc/profile.d/left-pad.sh")
        print("  %-9s /etc/profile.d/left-pad.sh" % ("CREATED!" if leaked else "absent"))
        diffed = second_act(world, corral, tmp, env, project)
        print(NEXT_STEPS, end="")
        return 0 if same and not leaked and code == 0 and diffed else 1


def second_act(world, corral, tmp, env, project):
    """Audit version 1.0 and 1.1 of a package; `corral diff` shows what 1.1 added."""
    print("\n\033[1mSecond act: what does version 1.1 do that 1.0 did not?\033[0m", flush=True)
    package = [sys.executable, os.path.join(HERE, "package.py")]
    reports = {}
    for version in ("1.0", "1.1"):
        reports[version] = os.path.join(tmp, "v%s.json" % version)
        banner("corral audit --report v%s.json -- python package.py %s" % (version, version))
        done = world.run(corral + ["audit", "--report", reports[version], "--"] + package + [version],
                         env=env, cwd=project, timeout=120, capture_output=True, text=True)
        sys.stdout.write(done.stdout)
    banner("corral diff v1.0.json v1.1.json")
    diff = world.run(corral + ["diff", reports["1.0"], reports["1.1"]], capture_output=True, text=True,
                     timeout=60)
    sys.stdout.write(diff.stdout + diff.stderr)
    print("(exit %d: something is new)" % diff.returncode if diff.returncode == 1 else
          "(exit %d)" % diff.returncode)
    return diff.returncode == 1 and "webhook.site" in diff.stdout


if __name__ == "__main__":
    sys.exit(main())
