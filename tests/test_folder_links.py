"""Symbolic links in an image folder: a loop, a class folder linked to another class, a file
linked into two classes or into both splits. Each used to multiply or mislabel the data with exit
0 (``cat/loop -> ..`` turned 12 images into 492, dog images labelled cat, the same files in
train, val and test); now a loop and a two-class file are refused by path, and a link within one
class adds nothing twice."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from PIL import Image

from normlab.data.folder_walk import FolderLinkError
from normlab.data.sources import index_imagefolder, load_source


def _folder(base: Path, classes: tuple[str, ...] = ("cat", "dog"), n: int = 6) -> Path:
    for label, cls in enumerate(classes):
        (base / cls).mkdir(parents=True)
        for i in range(n):
            Image.new("RGB", (8, 8), (40 * i, 100 * label, 0)).save(base / cls / f"{i}.png")
    return base


def test_loop_to_the_data_dir_is_refused_by_the_link(tmp_path: Path) -> None:
    root = _folder(tmp_path / "images")
    os.symlink("..", root / "cat" / "loop")
    with pytest.raises(FolderLinkError) as info:
        load_source("imagefolder", root)
    msg = str(info.value)
    assert f"{root / 'cat' / 'loop'} is a symbolic link to {root}" in msg
    assert f"rm {root / 'cat' / 'loop'}" in msg and "data.data_dir" in msg


def test_loop_through_a_folder_above_the_data_dir_names_the_link(tmp_path: Path) -> None:
    root = tmp_path / "images"
    _folder(root / "train")
    _folder(root / "test", n=2)
    os.symlink("../../..", root / "train" / "cat" / "up")  # up -> tmp_path, which holds images/
    with pytest.raises(FolderLinkError, match=f"{root / 'train' / 'cat' / 'up'} is a symbolic"):
        index_imagefolder(root)


def test_class_folder_linked_to_another_class_is_refused(tmp_path: Path) -> None:
    root = _folder(tmp_path / "images")
    os.symlink("cat", root / "kitty")
    with pytest.raises(FolderLinkError) as info:
        index_imagefolder(root)
    msg = str(info.value)
    assert f"{root / 'cat'} (class 'cat')" in msg and f"{root / 'kitty'} (class 'kitty')" in msg


def test_file_linked_into_two_classes_is_refused_naming_both(tmp_path: Path) -> None:
    root = _folder(tmp_path / "images")
    os.symlink("../dog/0.png", root / "cat" / "x.png")
    with pytest.raises(FolderLinkError) as info:
        index_imagefolder(root)
    msg = str(info.value)
    assert str(root / "cat" / "x.png") in msg and str(root / "dog" / "0.png") in msg


def test_file_linked_into_train_and_test_is_refused(tmp_path: Path) -> None:
    root = tmp_path / "images"
    _folder(root / "train")
    _folder(root / "test", n=2)
    os.symlink("../../train/cat/3.png", root / "test" / "cat" / "x.png")
    with pytest.raises(FolderLinkError) as info:
        index_imagefolder(root)
    msg = str(info.value)
    assert "(class 'cat' of train/)" in msg and "(class 'cat' of test/)" in msg


def test_links_within_one_class_count_each_image_once(tmp_path: Path) -> None:
    root = _folder(tmp_path / "images")
    (root / "cat" / "more").mkdir()
    Image.new("RGB", (8, 8)).save(root / "cat" / "more" / "a.png")
    os.symlink("more", root / "cat" / "again")  # the same folder twice
    os.symlink("0.png", root / "cat" / "copy.png")  # the same file twice
    index = index_imagefolder(root)
    assert len(index.train) == 13
    assert [label for _, label in index.train] == [0] * 7 + [1] * 6
    assert len({os.path.realpath(p) for p, _ in index.train}) == 13
