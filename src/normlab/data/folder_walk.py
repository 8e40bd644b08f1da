"""Listing the images of an image folder when symbolic links are involved.

A folder someone hands you may hold links: ``cat/loop -> ..`` (a loop, which torchvision's
``make_dataset`` follows 40 levels deep, listing every image, dog images included, dozens of
times under ``cat``), ``kitty -> cat`` (a second class with the same files), or one file linked
into two classes or into both ``train/`` and ``test/``. :class:`FolderWalk` follows a link at most
once per directory (identified by device and inode), refuses a loop by the link's path, and
refuses a directory or file that would land in two classes or two splits, naming both paths.
A directory or file reached twice within one class is listed once.
"""

from __future__ import annotations

import os
from pathlib import Path

from normlab.errors import NormlabError

_Id = tuple[int, int]  # (st_dev, st_ino): the same directory or file whatever path reaches it


class FolderLinkError(NormlabError, RuntimeError):
    """A symbolic link in an image folder makes a loop, or puts one file in two classes/splits."""


def _identity(path: str) -> _Id:
    st = os.stat(path)  # follows links: what the path points at
    return st.st_dev, st.st_ino


def _owner(split: str, label: str) -> str:
    return f"class {label!r} of {split}" if split else f"class {label!r}"


class FolderWalk:
    """The image files of class folders, each file once, across every split of one data set.

    Usage::

        walk = FolderWalk(data_dir)
        train = walk.samples(data_dir / "train", {"cat": 0, "dog": 1}, split="train/")
        test = walk.samples(data_dir / "test", {"cat": 0, "dog": 1}, split="test/")

    Raises:
        FolderLinkError: a loop, or a directory or file reached from two classes or splits.
    """

    def __init__(self, data_dir: str | Path) -> None:
        self.data_dir = Path(data_dir)
        self._dirs: dict[_Id, tuple[str, str]] = {}  # directory -> (first path, owner)
        self._files: dict[_Id, tuple[str, str]] = {}

    def samples(
        self, base: Path, class_to_idx: dict[str, int], split: str = ""
    ) -> list[tuple[str, int]]:
        """(path, label) of the visible image files under ``base/<class>/``, in the order of
        torchvision's ``make_dataset`` (class, then directory path, then file name)."""
        found: list[tuple[str, int]] = []
        for label, index in sorted(class_to_idx.items(), key=lambda item: item[1]):
            top = base / label
            if top.is_dir():
                found += [(p, index) for p in self._class_files(str(top), _owner(split, label))]
        return found

    def _class_files(self, top: str, owner: str) -> list[str]:
        from torchvision.datasets.folder import IMG_EXTENSIONS, has_file_allowed_extension

        # the ancestors from data_dir down: a link to any of them is a loop
        above = Path(top).parents
        outer = [p for p in above if p == self.data_dir or self.data_dir in p.parents]
        chains = {top: (*(_identity(str(p)) for p in outer), _identity(top))}
        listed: list[tuple[str, list[str]]] = []
        if not self._claim_dir(top, chains[top][-1], owner):
            return []
        for root, dirnames, filenames in os.walk(top, followlinks=True):
            keep = []
            for name in sorted(d for d in dirnames if not d.startswith(".")):
                path = os.path.join(root, name)
                ident = _identity(path)
                if ident in chains[root]:
                    raise self._loop(path)
                if self._claim_dir(path, ident, owner):
                    chains[path] = (*chains[root], ident)
                    keep.append(name)
            dirnames[:] = keep  # os.walk descends only into these
            files = [
                os.path.join(root, f)
                for f in sorted(filenames)
                if not f.startswith(".") and has_file_allowed_extension(f, IMG_EXTENSIONS)
            ]
            listed.append((root, [f for f in files if self._claim_file(f, owner)]))
        return [path for _, files in sorted(listed) for path in files]

    def _claim_dir(self, path: str, ident: _Id, owner: str) -> bool:
        """True the first time a directory is reached; False when its class already has it."""
        first = self._dirs.setdefault(ident, (path, owner))
        if first[1] != owner:
            raise self._twice("folder", first, (path, owner))
        return first[0] == path

    def _claim_file(self, path: str, owner: str) -> bool:
        try:
            ident = _identity(path)
        except OSError:  # a dangling link: listed, so decoding names the file
            return True
        first = self._files.setdefault(ident, (path, owner))
        if first[1] != owner:
            raise self._twice("image file", first, (path, owner))
        return first[0] == path

    def _loop(self, path: str) -> FolderLinkError:
        # the deepest link on the way down is the one to remove (path itself, for cat/loop -> ..)
        link = next((str(p) for p in (Path(path), *Path(path).parents) if p.is_symlink()), path)
        return FolderLinkError(
            f"data.name=imagefolder: {link} is a symbolic link to {os.path.realpath(link)}, a"
            f" folder that contains it (data.data_dir={self.data_dir}): following it would list"
            " the same images again and again, under the wrong class. Fix: remove the link"
            f" (rm {link}), or replace it with a folder holding copies of the images it should add."
        )

    def _twice(self, what: str, first: tuple[str, str], second: tuple[str, str]) -> FolderLinkError:
        return FolderLinkError(
            f"data.name=imagefolder: the same {what} is reached as {first[0]} ({first[1]}) and as"
            f" {second[0]} ({second[1]}) through a symbolic link (data.data_dir={self.data_dir}),"
            " so the same images would get two labels or sit in two splits. Fix: keep one of the"
            " two (remove the link, or put a copy where each belongs)."
        )
