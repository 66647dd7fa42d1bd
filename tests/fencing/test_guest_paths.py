"""Which of this machine's trees the fencing lab's guest mounts again: those under a place its
init covers with a tmpfs (a clone of the repository in /tmp, as CI may make), else its Python
and the project would not be there (the guest server fails to start)."""

from __future__ import annotations

from virtlease_lab.fencing.guest import masked_trees


def test_a_clone_in_tmp_is_mounted_again_once_with_its_virtualenv_inside() -> None:
    assert masked_trees("/tmp/ci/.venv", "/tmp/ci") == ["/tmp/ci"]


def test_trees_outside_the_masked_places_need_nothing() -> None:
    assert masked_trees("/opt/venv", "/srv/virtlease") == []


def test_a_virtualenv_elsewhere_and_a_clone_in_tmp() -> None:
    assert masked_trees("/opt/venv", "/var/tmp/build/virtlease") == ["/var/tmp/build/virtlease"]
