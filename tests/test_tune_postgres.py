"""Tuning across machines for real: two ``tune`` worker processes share one study in a PostgreSQL server.

The server runs on localhost in a temporary directory (free port, unix socket in the same directory) and
is stopped afterwards. It needs PostgreSQL's server binaries (``initdb``, ``pg_ctl``: on ``PATH`` or in
``/usr/lib/postgresql/<version>/bin``, Debian's ``postgresql`` package); without them the test is skipped.
``initdb`` refuses to run as root, so as root the server runs as ``nobody`` (via ``runuser`` or ``su``).
"""

from __future__ import annotations

import glob
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

pytestmark = pytest.mark.postgres

WORKER_ARGS = [
    "--env", "games:differential", "-n", "64", "--n-trials", "2", "--sampler", "random", "--pruner", "none",
    "--n-evaluations", "1", "--eval-episodes", "1", "--no-optim-plots", "--study-name", "shared",
    "-params", "n_steps:32", "batch_size:32", "n_critic_updates:1", "policy_kwargs:dict(net_arch=[16])",
]  # fmt: skip


def _server_binaries() -> tuple[str, str] | None:
    found = shutil.which("initdb"), shutil.which("pg_ctl")
    if all(found):
        return found  # type: ignore[return-value]
    for bindir in sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda p: int(re.sub(r"\D", "", p) or 0)):
        initdb, pg_ctl = os.path.join(bindir, "initdb"), os.path.join(bindir, "pg_ctl")
        if os.access(initdb, os.X_OK) and os.access(pg_ctl, os.X_OK):
            found = initdb, pg_ctl
    return found if all(found) else None  # type: ignore[return-value]


def _as_server_user() -> list[str] | None:
    """Command prefix that runs the server as a non-root user (initdb refuses root); [] if not root."""
    if os.geteuid() != 0:
        return []
    for prefix in (["runuser", "-u", "nobody", "--"], ["su", "nobody", "-s", "/bin/sh", "-c"]):
        if shutil.which(prefix[0]) is None:
            continue
        probe = [*prefix, "true"]
        if subprocess.run(probe, capture_output=True, timeout=30).returncode == 0:
            return prefix
    return None


def _run(prefix: list[str], command: list[str]) -> subprocess.CompletedProcess[str]:
    if prefix and prefix[0] == "su":  # su -c takes one shell string
        command = [" ".join(map(_quote, command))]
    return subprocess.run([*prefix, *command], capture_output=True, text=True, timeout=120)


def _quote(arg: str) -> str:
    import shlex

    return shlex.quote(arg)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def postgres_url() -> Iterator[str]:
    pytest.importorskip("psycopg2", reason="psycopg2 (the tests extra) talks to PostgreSQL")
    binaries = _server_binaries()
    if binaries is None:
        pytest.skip("PostgreSQL server binaries (initdb, pg_ctl) not found on PATH or in /usr/lib/postgresql/*/bin")
    initdb, pg_ctl = binaries
    prefix = _as_server_user()
    if prefix is None:
        pytest.skip("running as root and cannot switch to user 'nobody' (runuser/su): initdb refuses root")
    # A short path (unix socket length limit) the server user can reach; pytest's tmp_path is root-only.
    base = Path(tempfile.mkdtemp(prefix="sb3pg_", dir="/tmp"))
    data, log = base / "data", base / "server.log"
    if prefix:
        os.chmod(base, 0o755)
        shutil.chown(base, user="nobody")
    port = _free_port()
    started = False
    try:
        result = _run(prefix, [initdb, "-D", str(data), "-A", "trust", "-U", "postgres", "--no-sync", "-E", "UTF8"])
        if result.returncode != 0:
            pytest.skip(f"initdb failed: {result.stderr.strip()[-300:]}")
        options = f"-k {base} -p {port} -c listen_addresses=127.0.0.1 -F"
        result = _run(prefix, [pg_ctl, "-D", str(data), "-o", options, "-l", str(log), "-w", "-t", "60", "start"])
        if result.returncode != 0:
            server_log = log.read_text()[-500:] if log.exists() else ""
            pytest.fail(f"pg_ctl start failed: {result.stderr.strip()} {server_log}")
        started = True
        yield f"postgresql://postgres@127.0.0.1:{port}/postgres"
    finally:
        if started:
            _run(prefix, [pg_ctl, "-D", str(data), "-m", "immediate", "-w", "stop"])
        shutil.rmtree(base, ignore_errors=True)


def test_two_tune_workers_share_one_postgres_study(postgres_url: str, tmp_path: Path) -> None:
    import optuna

    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    workers = []
    for seed in (1, 2):
        command = [sys.executable, "-m", "sb3_hatrpo.tune", *WORKER_ARGS, "--storage", postgres_url]
        command += ["--seed", str(seed), "-f", str(tmp_path / f"worker{seed}")]
        workers.append(
            subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path)
        )
    outputs = []
    for worker in workers:
        try:
            out, err = worker.communicate(timeout=240)
        except subprocess.TimeoutExpired:
            for w in workers:
                w.kill()
            raise
        assert worker.returncode == 0, f"worker failed:\n{out}\n{err}"
        outputs.append(out)

    # Each worker's own account of the trials it ran
    ran = []
    for out in outputs:
        match = re.search(r"this worker ran 2: \[(\d+), (\d+)\]", out)
        assert match, out
        ran.append({int(match.group(1)), int(match.group(2))})
    assert ran[0].isdisjoint(ran[1]), f"a trial was run twice: {ran}"

    # The study in the server: exactly the four trials, each complete, numbered once, two per worker
    storage = postgres_url.replace("postgresql://", "postgresql+psycopg2://")
    study = optuna.load_study(study_name="shared", storage=storage)
    trials = study.get_trials(deepcopy=False)
    assert sorted(t.number for t in trials) == [0, 1, 2, 3]
    assert ran[0] | ran[1] == {0, 1, 2, 3}
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in trials), [t.state for t in trials]
    assert all(t.value is not None for t in trials)
    by_worker: dict[str, set[int]] = {}
    for t in trials:
        by_worker.setdefault(t.user_attrs["worker"], set()).add(t.number)
    assert sorted(by_worker.values(), key=min) == sorted(ran, key=min)
    assert len({t.user_attrs["worker"] for t in trials}) == 2
