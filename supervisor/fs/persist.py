"""Files the host runs later, inside the directories the sandbox may write (DESIGN §3).

A writable working directory or ``--rw PATH`` would let the command plant code that
runs on the host after corral has exited: a line in ``~/.bashrc``, a desktop autostart
entry, a systemd user unit, a git hook, a ``core.fsmonitor`` in ``.git/config`` (git
runs it on the next ``git status``).  Pure, like the rest of the mount plan: this module
decides from a filesystem probe (``lstat``/``listdir``, and ``entries`` when the probe
has it) and returns what to mount; :mod:`corral.fs.plan` places it.

Two rules:

**A working directory that holds your home, or the startup files in it, is an
overlay** — writes there are discarded (and recorded in the overlay's upper layer,
which the audit reads) — unless ``--rw`` names it.  That covers ``cd ~``, ``cd /home``
and ``cd ~/.config``.  An explicit ``--rw`` of such a directory is taken as consent:
a startup file that does not exist yet (``~/.bash_login``) cannot be protected
without creating it on the host — which changes which file the shell reads — so
corral does not pretend to; it fingerprints them before the start and the audit
reports what changed.

**In every writable directory, the git repositories found stay protected**: for each
git directory (``.git``, and below it ``modules/*`` of submodules, nested ones too)
the directory is bound onto itself (a mount point cannot be renamed or removed, so
``mv .git x; mkdir .git`` fails with EBUSY), ``hooks/`` becomes an overlay (new hooks
land in its upper layer), ``config`` and ``config.worktree`` are replaced by private
copies bound over them (written in the sandbox, compared at exit).  A ``.git`` *file*
(a submodule's or worktree's ``gitdir: ...`` pointer) and a ``commondir`` (where a linked worktree's git reads
its config from) get private copies too; a ``commondir`` created in a git directory
would redirect its config, and is reported.
``--allow-persist`` turns this off; the same paths are then fingerprinted instead, so
the audit still flags what changed.

Finding repositories costs start-up time, so the search is bounded: breadth first,
directories up to :data:`SCAN_DEPTH` levels below each writable directory, at most
:data:`SCAN_DIRS` directories and :data:`SCAN_ENTRIES` entries in all, skipping
:data:`SCAN_SKIP` (dependency and cache trees).  The submodules of a repository found
are all covered: their git directories are in its ``.git/modules``.
What it does not cover (docs/security.md): a repository deeper than that, and a *new*
repository the command creates (``mkdir sub/.git`` with a config of its own) —
no mount can forbid a name that does not exist yet.
"""

import os
import re

import attrs

# Relative to the home directory.  Files a shell, the desktop session or a tool runs
# (or reads commands from) when the user logs in or starts it.
HOME_STARTUP_FILES = (
    ".bashrc", ".bash_profile", ".bash_login", ".bash_logout", ".profile",
    ".zshrc", ".zshenv", ".zprofile", ".zlogin", ".zlogout",
    ".login", ".logout", ".cshrc", ".tcshrc", ".kshrc", ".mkshrc",
    ".xprofile", ".xsessionrc", ".xsession", ".xinitrc", ".pam_environment",
    ".gitconfig", ".vimrc", ".exrc", ".emacs", ".inputrc",
)
# Directories whose content runs (or configures what runs) at login or start.
HOME_STARTUP_DIRS = (
    ".config/autostart", ".config/autostart-scripts", ".config/systemd/user",
    ".local/share/systemd/user", ".config/environment.d", ".config/plasma-workspace/env",
    ".config/plasma-workspace/shutdown", ".kde/Autostart", ".config/fish", ".config/git",
    ".config/nvim", ".vim", ".emacs.d",
)

# The cost is the directories opened (~10-20 us each on a quiet machine, ~100 under
# load): 100 of them cover a repository's first two levels in most projects.
SCAN_DEPTH = 2  # directory levels below a writable directory searched for .git
SCAN_DIRS = 100  # directories read in all, per sandbox
SCAN_ENTRIES = 4000  # directory entries read in all, per sandbox
MODULES_DEPTH = 6  # levels of .git/modules/ (a submodule's name may contain '/')
GITDIR_DIRS = 256  # directories read inside git directories (modules/, worktrees/)
GITDIR_ENTRIES = 8192
SCAN_SKIP = frozenset((
    "node_modules", ".venv", "venv", "__pycache__", ".tox", ".nox", ".mypy_cache",
    ".pytest_cache", ".ruff_cache", ".cache", ".gradle", ".cargo", ".rustup", ".npm",
))

# Actions the plan places (see corral.fs.plan._Planner.place): bind a git directory
# onto itself, a private copy over a file, an overlay over a directory; WATCH: no
# mount (a name that does not exist yet), fingerprinted for the audit instead.
KEEP, COPY, DISCARD, WATCH = "persist-keep", "persist-copy", "persist-discard", "persist-watch"
ACTIONS = (KEEP, COPY, DISCARD)

_GIT_PATH = re.compile(
    r"(?:^|/)\.git(?:/modules/.+?)?(?:/worktrees/[^/]+)?/(?:config|config\.worktree|commondir|hooks/.+)$"
)


@attrs.frozen(kw_only=True)
class Protection:
    """What to place for the writable directories: ``items`` as
    ``(path, action, kind)`` — ``kind`` "dir", "file" or "missing" —, ``watch``:
    host paths left writable on purpose, fingerprinted before the start, and
    ``repos``: the ``.git`` entries found (one found after the run is a new one)."""

    items: tuple = ()
    watch: tuple = ()
    repos: tuple = ()


def _under(path, top):
    return path == top or top == "/" or path.startswith(top + "/")


def home_startup_paths(home):
    """The absolute startup files and directories of ``home``."""
    home = home.rstrip("/") or "/"
    return tuple(os.path.join(home, rel) for rel in HOME_STARTUP_FILES + HOME_STARTUP_DIRS)


def holds_startup(path, home):
    """Whether a writable ``path`` would expose the home directory or a startup file:
    ``path`` is the home, above it, above a startup path, or inside a startup dir."""
    if _under(home, path):
        return True
    return any(_under(p, path) or _under(path, p) for p in home_startup_paths(home))


def cwd_notice(cwd, home, allow_persist):
    """The one line that says why the working directory ``cwd`` is an overlay rather
    than writable, or None when it is writable."""
    if cwd == "/":
        return ("the working directory is /: writes are discarded (the host view is an "
                "overlay); cd to a project directory to keep them")
    if _under(home, cwd):
        return ("the working directory %s holds your home directory: it is an overlay, "
                "writes are discarded (--rw %s keeps them)" % (cwd, cwd))
    if not allow_persist and holds_startup(cwd, home):
        return ("the working directory %s holds files the host runs at login or start-up: "
                "it is an overlay, writes are discarded (--rw %s or --allow-persist keeps them)"
                % (cwd, cwd))
    return None


def is_persistence(path):
    """Why a change to host ``path`` would make code run later, or None."""
    name = os.path.basename(path)
    if name in _STARTUP_NAMES or any(d in path for d in _STARTUP_DIRS):
        return "a file that runs at login/startup"
    if _GIT_PATH.search(path):
        return "a git hook or config (git on the host runs what it names)"
    if name == ".git":
        return "a repository's .git (git on the host follows it)"
    return None


# Names and path fragments the audit flags wherever they are (the home may be
# another one than the supervisor's, and system paths count too).
_STARTUP_NAMES = frozenset(
    tuple(os.path.basename(f) for f in HOME_STARTUP_FILES)
    + ("config.fish", "authorized_keys", "crontab", "rc.local")
)
_STARTUP_DIRS = tuple("/%s/" % d for d in HOME_STARTUP_DIRS) + (
    "/etc/cron", "/var/spool/cron/", "/etc/systemd/", "/etc/profile.d/", "/.ssh/",
    "/etc/init.d/", "/etc/xdg/autostart/",
)


# What a git directory holds; a directory that holds all of it is a bare repository
# (a push to it runs its hooks on the host).
_BARE = {("HEAD", "file"), ("config", "file"), ("objects", "dir"), ("refs", "dir")}


class _Scan:
    """A bounded reader of directories: at most ``dirs`` directories and ``entries``
    entries; past that, directories read as empty."""

    def __init__(self, fs, dirs, entries):
        self.fs = fs
        self.dirs = dirs
        self.budget = entries

    def entries(self, path):
        """``[(name, kind)]`` of a directory, sorted by name."""
        if self.dirs <= 0 or self.budget <= 0:
            return []
        lister = getattr(self.fs, "entries", None)
        if lister is not None:
            found = lister(path)
        else:
            found = []
            for name in self.fs.listdir(path):
                st = self.fs.lstat(os.path.join(path, name))
                if st is not None:
                    found.append((name, st.kind))
        self.dirs -= 1
        self.budget -= len(found)
        return sorted(found)

    def git_entries(self, root):
        """``[(path of a .git, kind)]`` at most SCAN_DEPTH levels below ``root``,
        breadth first (what a search cut short misses is the deepest); a bare
        repository (or ``root`` inside a git directory) has kind "gitdir"."""
        found, level = [], [root]
        if "/.git/" in root + "/":
            found.append((root[:(root + "/").index("/.git/") + 5], "gitdir"))
        for depth in range(SCAN_DEPTH + 1):
            below = []
            for directory in level:
                entries = self.entries(directory)
                if _BARE <= set(entries):
                    found.append((directory, "gitdir"))
                    continue
                for name, kind in entries:
                    if name == ".git":
                        found.append((os.path.join(directory, name), kind))
                    elif kind == "dir" and depth < SCAN_DEPTH and name not in SCAN_SKIP:
                        below.append(os.path.join(directory, name))
            level = below
        return found

    def gitdirs(self, gitdir, depth=0):
        """``gitdir`` and the submodule git directories below its ``modules/``."""
        out = [gitdir]
        modules = os.path.join(gitdir, "modules")
        st = self.fs.lstat(modules)
        if st is None or st.kind != "dir" or depth >= MODULES_DEPTH:
            return out
        level = [modules]
        for _ in range(MODULES_DEPTH):
            below = []
            for directory in level:
                names = dict(self.entries(directory))
                if names.get("config") == "file" and names.get("HEAD") == "file":
                    out.extend(self.gitdirs(directory, depth + 1))
                    continue
                below.extend(os.path.join(directory, n) for n, k in names.items() if k == "dir")
            level = below
        return out


def _gitdir_items(fs, gitdir, scan):
    items = [(gitdir, KEEP, "dir")]
    # commondir: where git reads the config from (a linked worktree's points to
    # the main .git); one created in any git directory redirects it.
    for name in ("config", "config.worktree", "commondir"):
        path = os.path.join(gitdir, name)
        st = fs.lstat(path)
        if st is not None and st.kind == "file":
            items.append((path, COPY, "file"))
        elif st is None and name == "commondir":
            items.append((path, WATCH, "missing"))
    hooks = os.path.join(gitdir, "hooks")
    st = fs.lstat(hooks)
    if st is None:
        items.append((hooks, DISCARD, "missing"))
    elif st.kind == "dir":
        items.append((hooks, DISCARD, "dir"))
    worktrees = os.path.join(gitdir, "worktrees")
    st = fs.lstat(worktrees)
    if st is not None and st.kind == "dir":
        for name, kind in scan.entries(worktrees):
            for leaf in ("config.worktree", "commondir"):
                path = os.path.join(worktrees, name, leaf)
                st = fs.lstat(path) if kind == "dir" else None
                if st is not None and st.kind == "file":
                    items.append((path, COPY, "file"))
    return items


def _search(fs):
    return _Scan(fs, SCAN_DIRS, SCAN_ENTRIES)


def git_entries(fs, roots):
    """``[(path of a .git, kind)]`` below the directories ``roots``, as bounded as the
    search :func:`protect` makes (the audit repeats it after the run)."""
    scan = _search(fs)
    found = []
    for root in roots:
        found.extend(scan.git_entries(root))
    return found


def protect(fs, writable, home, allow_persist):
    """The :class:`Protection` for the writable directories ``writable`` (real paths,
    directories that show the host read-write)."""
    scan, inside = _search(fs), _Scan(fs, GITDIR_DIRS, GITDIR_ENTRIES)
    items, watch, repos = [], [], []
    for root in writable:
        if holds_startup(root, home):
            # an explicit --rw of the home or of a startup directory: consent
            watch.extend(p for p in home_startup_paths(home) if _under(p, root))
        for path, kind in scan.git_entries(root):
            repos.append(path)
            if kind == "file":
                items.append((path, COPY, "file"))
            elif kind in ("dir", "gitdir"):
                for gitdir in inside.gitdirs(path):
                    items.extend(_gitdir_items(fs, gitdir, inside))
    if allow_persist:
        watch.extend(path for path, action, _ in items if action != KEEP)
        items = [item for item in items if item[1] == WATCH]
    return Protection(items=tuple(dict.fromkeys(items)), watch=tuple(dict.fromkeys(watch)),
                      repos=tuple(repos))
