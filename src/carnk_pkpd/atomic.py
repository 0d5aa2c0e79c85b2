"""The output rule, in one place: what a command may write, and how it writes it.

Every command that writes files goes through this module:

* a command writes only into a folder it creates, or adds its own named files to an existing folder;
* it never replaces or deletes a fit folder (a folder with ``manifest.json``), a file that is not its
  own earlier output, or a folder it did not create; instead it raises :class:`OutputRefused` saying
  what would be lost and how to proceed (the CLI exits 1);
* folders a command creates hold a small marker, ``.carnk-pkpd.json``, naming the kind of folder and
  the files each command wrote there; files a command adds to an existing folder are recorded in that
  folder's marker. This is how a later run (or ``--overwrite``) proves an output is its own;
* results are written to a temporary path and renamed into place, so an interrupted run (Ctrl-C,
  kill -9) never leaves a half-written file or folder and never destroys the previous one;
* folders and files get the user's umask (``tempfile`` alone would make them private, 0700/0600).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from carnk_pkpd.errors import OutputExists, OutputRefused

__all__ = [
    "MARKER",
    "OutputRefused",
    "atomic_folder",
    "check_folder_output",
    "check_output_files",
    "folder_kind",
    "output_files",
    "write_file_atomic",
    "write_text_atomic",
]

#: Name of the marker file in folders written by carnk-pkpd (JSON: kind, command, version, files).
MARKER = ".carnk-pkpd.json"
#: The files of a fit folder (written by ``carnk-pkpd fit``), and files other modules cache in it.
FIT_FILES = ("posterior.nc", "model.toml", "data.csv", "summary.csv", "manifest.json")
FIT_CACHES = ("remission.nc", "remission_published.nc")
#: Outputs other commands put in a fit folder by default or as the README teaches; recognised as theirs
#: in folders written before markers existed.
FIT_DERIVED = {"remission.csv": "predict", "report.html": "report", "export": "export", "doses": "doses"}
#: What a command's own folder holds, to recognise folders written before markers existed.
_KNOWN_FOLDERS = {
    "doses": lambda name: name in ("ranking.csv", "about.txt", "doses.nc") or name.endswith(".png"),
    "export": lambda name: name
    in ("parameters.csv", "subjects.csv", "sdtab.csv", "export.json", "export.md", "parameters.tex",
        "subjects.tex", "sdtab.tex", "posterior.nc", "posterior_predictive.nc"),
}  # fmt: skip

_umask_lock = threading.Lock()


def _umask() -> int:
    """The process umask (read without changing it for longer than two system calls)."""
    with _umask_lock:
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


def folder_mode() -> int:
    """Permissions of a new folder under the user's umask (e.g. 0o755 with umask 022)."""
    return 0o777 & ~_umask()


def file_mode() -> int:
    """Permissions of a new file under the user's umask (e.g. 0o644 with umask 022)."""
    return 0o666 & ~_umask()


# --- markers ----------------------------------------------------------------------------------------------
def read_marker(folder: str | os.PathLike) -> dict[str, Any]:
    """The marker of ``folder`` (empty when there is none or it cannot be read)."""
    p = Path(folder) / MARKER
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _write_marker(folder: Path, data: dict[str, Any]) -> None:
    write_text_atomic(folder / MARKER, json.dumps(data, indent=1, sort_keys=True) + "\n")


def _new_marker(kind: str | None, command: str) -> dict[str, Any]:
    from carnk_pkpd import __version__

    return {
        "tool": "carnk-pkpd",
        "version": __version__,
        "kind": kind,
        "command": command,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "files": {},
    }


def folder_kind(folder: str | os.PathLike) -> str | None:
    """``"fit"`` for a fit folder (has ``manifest.json``), the marker's kind for a folder a carnk-pkpd
    command created (``"doses"``, ``"export"``, ...), else None."""
    folder = Path(folder)
    if not folder.is_dir():
        return None
    if (folder / "manifest.json").exists():
        return "fit"
    marker = read_marker(folder)
    kind = marker.get("kind")
    if kind:
        return str(kind)
    if not marker:
        return _legacy_kind(folder)
    return None


def _legacy_kind(folder: Path) -> str | None:
    """The kind of a folder a command wrote before markers existed: every entry is that kind's output."""
    try:
        names = [p.name for p in folder.iterdir() if p.is_file() and not _leftover(p.name)]
        dirs = [p for p in folder.iterdir() if p.is_dir() and not _leftover(p.name)]
    except OSError:
        return None
    if not names or dirs:
        return None
    for kind, known in _KNOWN_FOLDERS.items():
        if all(known(n) for n in names):
            return kind
    return None


def _owner(folder: Path, name: str) -> str | None:
    """The command that wrote ``folder/name`` according to the folder's marker (None if unknown)."""
    kind = folder_kind(folder)
    if kind == "fit" and (name in FIT_FILES or name in FIT_CACHES):
        return "fit"
    marker = read_marker(folder)
    files = marker.get("files")
    if isinstance(files, dict) and isinstance(files.get(name), str):
        return files[name]
    if kind == "fit" and name in FIT_DERIVED:
        return FIT_DERIVED[name]
    if not marker and kind in _KNOWN_FOLDERS and _KNOWN_FOLDERS[kind](name):
        return kind
    return None


def _leftover(name: str) -> bool:
    """The marker, or a temporary file/folder an interrupted carnk-pkpd run left behind."""
    return name == MARKER or (name.startswith(".") and (".tmp-" in name or ".old-" in name))


def _show(path: Path) -> str:
    return str(path)


def _listing(folder: Path, limit: int = 5) -> str:
    try:
        names = sorted(p.name for p in folder.iterdir() if p.name != MARKER)
    except OSError:
        return "?"
    more = f", ... ({len(names)} entries)" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


# --- checks -----------------------------------------------------------------------------------------------
def check_folder_output(
    dest: str | os.PathLike,
    kind: str,
    *,
    command: str,
    overwrite: bool = False,
    needs_overwrite: bool = False,
) -> None:
    """Refuse (raise :class:`OutputRefused`) unless ``command`` may write the folder ``dest`` whole.

    Allowed: ``dest`` does not exist; ``dest`` is an empty folder; ``dest`` is this kind's own earlier
    output (marker kind ``kind``, or a fit folder when ``kind == "fit"``) holding nothing but files
    carnk-pkpd commands wrote there. When ``needs_overwrite`` (the fit command), replacing an earlier
    output also needs ``overwrite``.
    """
    dest = Path(dest)
    flag = f"'carnk-pkpd {command}'"
    if not dest.exists() and not dest.is_symlink():
        return
    if not dest.is_dir() or dest.is_symlink():
        raise OutputRefused(
            f"{_show(dest)}: exists and is not a folder written by {flag}; writing there would replace it "
            f"and it would be lost. Nothing was written: choose another --out (a new folder)."
        )
    entries = [p for p in dest.iterdir()]
    if not entries:
        return
    have = folder_kind(dest)
    if have != kind:
        if have == "fit":
            raise OutputRefused(
                f"{_show(dest)}: is a fit folder (it has manifest.json); {flag} would replace it and the fit "
                f"would be lost. Nothing was written: use --out {_show(dest / kind)} or another new folder."
            )
        what = f"a '{have}' folder written by carnk-pkpd" if have else "a folder carnk-pkpd did not create"
        raise OutputRefused(
            f"{_show(dest)}: is {what} (holds {_listing(dest)}); {flag} would replace it and its contents "
            f"would be lost. Nothing was written: choose another --out (a new folder)."
        )
    foreign = [p.name for p in entries if not _leftover(p.name) and _owner(dest, p.name) is None]
    foreign = [n for n in foreign if not (kind == "fit" and (dest / n).is_dir() and folder_kind(dest / n))]
    if foreign:
        raise OutputRefused(
            f"{_show(dest)}: holds files no carnk-pkpd command wrote ({', '.join(sorted(foreign)[:5])}); "
            f"replacing the folder would lose them. Nothing was written: move them elsewhere or choose "
            f"another --out."
        )
    if needs_overwrite and not overwrite:
        raise OutputExists(
            f"{_show(dest)}: exists (an earlier {flag} output). Nothing was written: pass --overwrite to "
            f"replace it, or choose another --out."
        )


def check_output_files(folder: str | os.PathLike, names: Iterable[str], *, command: str) -> None:
    """Refuse (raise :class:`OutputRefused`) unless ``command`` may write each of ``names`` in ``folder``.

    A name may be written when no such file exists, or when the existing file is this command's own
    earlier output (recorded in the folder's marker). A folder that does not exist will be created.
    """
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise OutputRefused(
            f"{_show(folder)}: is a file, not a folder; 'carnk-pkpd {command}' writes its files into a "
            f"folder. Nothing was written: choose another --out."
        )
    if not folder.exists():
        return
    for name in names:
        target = folder / name
        if not target.exists() and not target.is_symlink():
            continue
        owner = _owner(folder, name)
        if owner == command and not target.is_dir():
            continue
        if owner == "fit":
            why = "it is part of the fit in this folder (manifest.json lists it); the fit would be damaged"
        elif target.is_dir():
            why = "it is a folder"
        elif owner:
            why = f"it was written by 'carnk-pkpd {owner}'"
        else:
            why = "it was not written by carnk-pkpd (or not by this command)"
        raise OutputRefused(
            f"{_show(target)}: exists and {why}; 'carnk-pkpd {command}' will not replace it. Nothing was "
            f"written: choose another --out folder, or move the file away."
        )


# --- writing ----------------------------------------------------------------------------------------------
def _make_temp_dir(parent: Path, prefix: str) -> Path:
    tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    os.chmod(tmp, folder_mode())
    return tmp


def _mkdirs(folder: Path) -> None:
    """Create ``folder`` and missing parents with the umask's permissions (``Path.mkdir`` does that)."""
    folder.mkdir(parents=True, exist_ok=True)


@contextmanager
def atomic_folder(
    dest: str | os.PathLike,
    *,
    overwrite: bool = False,
    kind: str = "folder",
    command: str | None = None,
    needs_overwrite: bool = True,
) -> Iterator[Path]:
    """Yield an empty temporary folder beside ``dest``; on success it becomes ``dest``.

    The output rule (:func:`check_folder_output`) is checked up front and again just before the rename;
    an earlier output of the same kind is replaced (with ``overwrite`` when ``needs_overwrite``). A
    marker naming ``kind`` and ``command`` is added. On any exception (including KeyboardInterrupt) the
    temporary folder is removed and ``dest`` is untouched.
    """
    dest = Path(dest)
    command = command or kind
    check_folder_output(dest, kind, command=command, overwrite=overwrite, needs_overwrite=needs_overwrite)
    _mkdirs(dest.parent)
    tmp = _make_temp_dir(dest.parent, f".{dest.name}.tmp-")
    try:
        yield tmp
        marker = _new_marker(kind, command)
        marker["files"] = {p.name: command for p in tmp.iterdir() if p.name != MARKER}
        if kind == "fit":  # later commands add their files to the fit's marker
            marker["files"] = {}
        _write_marker(tmp, marker)
        check_folder_output(dest, kind, command=command, overwrite=overwrite, needs_overwrite=needs_overwrite)
        if dest.exists():
            old = dest.with_name(f".{dest.name}.old-{os.getpid()}")
            os.replace(dest, old)
            os.replace(tmp, dest)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextmanager
def output_files(folder: str | os.PathLike, *, command: str, kind: str | None = None) -> Iterator[Path]:
    """Yield a temporary folder; the files written there become ``command``'s files in ``folder``.

    When ``folder`` does not exist it is created whole (temporary sibling folder renamed into place,
    with a marker of ``kind``, default ``command``). When it exists, each file must pass
    :func:`check_output_files`; the files are then moved in one by one (``os.replace``) and recorded in
    the folder's marker. On any exception the temporary files are removed and ``folder`` is untouched.
    """
    folder = Path(folder)
    if folder.exists() or folder.is_symlink():
        if not folder.is_dir():
            check_output_files(folder, [], command=command)  # raises: a file, not a folder
        tmp = _make_temp_dir(folder, f".{command}.tmp-")
        try:
            yield tmp
            names = sorted(p.name for p in tmp.iterdir())
            check_output_files(folder, names, command=command)
            marker = read_marker(folder) or _new_marker(None, command)
            files = marker.get("files") if isinstance(marker.get("files"), dict) else {}
            for name in names:
                target = folder / name
                if (tmp / name).is_dir():
                    if target.exists():
                        shutil.rmtree(target)
                os.replace(tmp / name, target)
                files[name] = command
            marker["files"] = files
            _write_marker(folder, marker)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    else:
        with atomic_folder(folder, kind=kind or command, command=command) as tmp:
            yield tmp


def write_text_atomic(path: str | os.PathLike, text: str, *, newline: str | None = None) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically."""

    def write(tmp: Path) -> None:
        with open(tmp, "w", encoding="utf-8", newline=newline) as fh:
            fh.write(text)

    return write_file_atomic(path, write)


def write_file_atomic(path: str | os.PathLike, write: Callable[[Path], object]) -> Path:
    """Call ``write(tmp_path)`` on a temporary sibling of ``path``, then rename it onto ``path``.

    The result keeps the permissions of the file it replaces (the umask's for a new file). This is the
    low-level step; commands check the output rule first (:func:`output_files`).
    """
    path = Path(path)
    _mkdirs(path.parent)
    mode = path.stat().st_mode & 0o777 if path.exists() else file_mode()
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        write(tmp)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def record_file(folder: str | os.PathLike, name: str, command: str) -> None:
    """Record in ``folder``'s marker that ``command`` wrote ``name`` (for files written by other means)."""
    folder = Path(folder)
    marker = read_marker(folder) or _new_marker(None, command)
    files = marker.get("files") if isinstance(marker.get("files"), dict) else {}
    files[name] = command
    marker["files"] = files
    _write_marker(folder, marker)
