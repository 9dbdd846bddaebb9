"""Removing what a sandbox leaves behind (its scratch tree, its state entry), here or in a
detached helper: ``python -I -S _remove.py PATH...`` removes each PATH and exits, closing
whatever fds it was given on the way out (:func:`corral.launch.cleanup_later`).

Standard library only, and nothing but ``os`` at import: the helper is a fresh interpreter
without site-packages, so that it costs a few ms of CPU in the background, not the ~100 ms
that importing corral would.
"""

import os
import sys


def _warn(text, *args):
    import logging  # only when something could not be removed

    logging.getLogger("corral.launch").warning(text, *args)


def remove_tree(path):
    """Remove a scratch tree whatever the sandbox left in it: any depth (iterative, one
    name per system call, a few descriptors), overlayfs work dirs with mode 000 and
    directories the command made read-only (made 0700 first), never following a symlink.
    What cannot be removed is logged, never raised."""
    parent, name = os.path.split(os.path.abspath(path))
    try:
        parent_fd = os.open(parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as exc:
        _warn("cannot remove %s: %s", path, exc.strerror)
        return
    try:
        left = _remove_at(parent_fd, name)
    except OSError as exc:
        _warn("cannot remove %s: %s", path, exc.strerror)
    else:
        if left:
            _warn("cannot remove %s: %d entries could not be removed", path, left)
    finally:
        os.close(parent_fd)


def _open_emptiable_dir(name, dir_fd):
    os.chmod(name, 0o700, dir_fd=dir_fd)  # a directory (unlink said EISDIR): no link to follow
    return os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)


def _remove_at(top_fd, top):
    """Remove ``top`` (in directory ``top_fd``) and everything below; return how many
    entries could not be removed.  Depth first, holding one directory fd and coming
    back up through ``..``; the path is kept as names, so any depth fits."""
    try:
        os.unlink(top, dir_fd=top_fd)
        return 0
    except FileNotFoundError:
        return 0
    except IsADirectoryError:
        pass
    fd = _open_emptiable_dir(top, top_fd)
    levels = [(top, os.listdir(fd))]  # from top_fd down to fd: (name, entries still to remove)
    left = 0
    try:
        while True:
            entries = levels[-1][1]
            child = None
            while entries and child is None:
                entry = entries.pop()
                try:
                    os.unlink(entry, dir_fd=fd)
                except IsADirectoryError:
                    try:
                        child = _open_emptiable_dir(entry, fd)
                    except OSError:
                        left += 1
                except FileNotFoundError:
                    pass
                except OSError:
                    left += 1
            if child is not None:
                os.close(fd)
                fd = child
                levels.append((entry, os.listdir(fd)))
                continue
            done, _ = levels.pop()
            if not levels:
                break
            parent = os.open("..", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=fd)
            os.close(fd)
            fd = parent
            try:
                os.rmdir(done, dir_fd=fd)
            except OSError:
                left += 1
    finally:
        os.close(fd)
    try:
        os.rmdir(top, dir_fd=top_fd)
    except OSError:
        left += 1
    return left


def main(paths):
    for path in paths:
        remove_tree(path)


if __name__ == "__main__":
    main(sys.argv[1:])
