"""What corral hides from the sandbox by default (DESIGN §3).

Paths in :data:`HOME_SECRETS` are relative to the user's home; the others are
absolute.  Only the ones that exist are hidden: a directory becomes an empty
read-only tmpfs, anything else (file, socket) an empty read-only file.  A later
``--ro PATH``/``--rw PATH`` on the same path (or a path below it) wins.
"""

# Credentials and tokens of the common tools and clouds.
CREDENTIALS = (
    ".ssh", ".gnupg", ".aws", ".azure", ".config/gcloud", ".kube", ".docker",
    ".netrc", ".npmrc", ".pypirc", ".git-credentials", ".config/git/credentials",
    ".config/gh", ".config/hub", ".config/glab-cli", ".cargo/credentials",
    ".cargo/credentials.toml", ".gem/credentials", ".config/containers/auth.json",
    ".terraform.d/credentials.tfrc.json", ".vault-token", ".s3cfg", ".boto",
    ".config/rclone", ".oci", ".config/op", ".m2/settings-security.xml", ".pgpass",
    ".my.cnf",
)

# Browser and mail profiles (cookies, saved passwords, session tokens).
BROWSER_PROFILES = (
    ".mozilla", ".thunderbird", ".config/google-chrome", ".config/google-chrome-beta",
    ".config/google-chrome-unstable", ".config/chromium", ".config/BraveSoftware",
    ".config/microsoft-edge", ".config/vivaldi", ".config/opera", ".var/app/org.mozilla.firefox",
    ".var/app/com.google.Chrome", ".var/app/org.chromium.Chromium", "snap/firefox",
    "snap/chromium", ".local/share/qutebrowser", ".config/epiphany",
)

# Keyrings and password stores.
KEYRINGS = (
    ".local/share/keyrings", ".password-store", ".local/share/kwalletd", ".pki",
)

# Shell and REPL histories (typed passwords, tokens on command lines).
HISTORIES = (
    ".bash_history", ".zsh_history", ".histfile", ".sh_history", ".python_history",
    ".local/share/fish/fish_history", ".psql_history", ".mysql_history", ".node_repl_history",
    ".lesshst", ".sqlite_history", ".rediscli_history", ".irb_history", ".viminfo",
    ".local/share/atuin", ".local/state/nvim/shada",
)

HOME_SECRETS = CREDENTIALS + BROWSER_PROFILES + KEYRINGS + HISTORIES

# Host sockets that would let the command act outside the sandbox: container
# and VM engines (root-equivalent for their group), snapd, the system bus,
# terminal multiplexers.  In the default mode overlayfs already refuses
# connect() to a host socket; read-only binds (readonly mode, --ro, the nfs
# fallback) do not, hence the list.
SYSTEM_SOCKETS = (
    "/run/docker.sock", "/run/containerd", "/run/podman", "/run/crio", "/run/buildkit",
    "/run/libvirt", "/run/incus", "/var/lib/incus/unix.socket", "/var/lib/lxd/unix.socket",
    "/var/snap/lxd/common/lxd/unix.socket", "/run/snapd.socket", "/run/snapd-snap.socket",
    "/run/dbus/system_bus_socket", "/run/screen",
)


def secret_paths(home, runtime_dir=None):
    """Absolute candidate paths to hide, in a stable order.

    ``runtime_dir`` is the user's ``$XDG_RUNTIME_DIR``: hidden whole, because
    everything in it is a door out of the sandbox (the session bus, the
    systemd user manager's private socket — ``systemd-run --user`` runs
    commands outside —, gpg-agent, keyring and ssh agents, Wayland, PulseAudio).
    """
    home = home.rstrip("/") or "/"
    paths = [home + "/" + rel for rel in HOME_SECRETS]
    paths.extend(SYSTEM_SOCKETS)
    if runtime_dir:
        paths.append(runtime_dir)
    return tuple(paths)
