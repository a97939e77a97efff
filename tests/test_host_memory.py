"""The start-up setting that puts glibc's mapped memory on huge pages."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from irtf_jax import host_memory
from tests.helpers import REPO

HUGE = host_memory.HUGE_PAGES


def test_adds_huge_pages_to_an_environment_without_tunables():
  environ = {"PATH": "/bin"}
  assert host_memory.huge_page_environment(environ, libc="glibc") == {
      "PATH": "/bin",
      "GLIBC_TUNABLES": "glibc.malloc.hugetlb=1",
  }
  assert environ == {"PATH": "/bin"}  # not modified


def test_keeps_the_users_other_tunables():
  environ = {"GLIBC_TUNABLES": "glibc.malloc.arena_max=2:glibc.pthread.x=1"}
  assert host_memory.huge_page_environment(environ, libc="glibc") == {
      "GLIBC_TUNABLES": (
          "glibc.malloc.arena_max=2:glibc.pthread.x=1:glibc.malloc.hugetlb=1"
      )
  }


@pytest.mark.parametrize(
    "environ, libc",
    [
        ({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}, "glibc"),  # the user's
        ({"GLIBC_TUNABLES": "a=1:glibc.malloc.hugetlb=2"}, "glibc"),
        ({"IRTF_JAX_SYSTEM_MALLOC": "1"}, "glibc"),  # opted out
        ({}, ""),  # musl, macOS: no glibc tunables
    ],
    ids=["set_by_user", "set_among_others", "opted_out", "not_glibc"],
)
def test_changes_nothing_when_set_opted_out_or_not_glibc(environ, libc):
  assert host_memory.huge_page_environment(environ, libc=libc) is None


def test_opting_out_with_zero_is_not_opting_out():
  assert host_memory.huge_page_environment(
      {"IRTF_JAX_SYSTEM_MALLOC": "0"}, libc="glibc"
  ) == {"IRTF_JAX_SYSTEM_MALLOC": "0", "GLIBC_TUNABLES": HUGE}


PROBE = textwrap.dedent("""
    import json, os, sys
    print(json.dumps({"pid": os.getpid(), "stage": "start"}), flush=True)
    from irtf_jax import host_memory
    host_memory.reexecute_with_huge_pages("probe")
    print(json.dumps({
        "pid": os.getpid(),
        "stage": "running",
        "argv": sys.argv[1:],
        "utf8_mode": sys.flags.utf8_mode,
        "tunables": os.environ.get("GLIBC_TUNABLES"),
    }))
""")


def run_probe(tmp_path, **env):
  (tmp_path / "probe.py").write_text(PROBE)
  environ = {
      k: v
      for k, v in os.environ.items()
      if k not in ("GLIBC_TUNABLES", host_memory.OPT_OUT)
  }
  environ.update(env)
  environ["PYTHONPATH"] = os.pathsep.join([str(tmp_path), REPO])
  finished = subprocess.run(
      [sys.executable, "-X", "utf8", "-m", "probe", "--flag=1", "word"],
      env=environ,
      capture_output=True,
      text=True,
      timeout=120,
      check=True,
  )
  return [json.loads(line) for line in finished.stdout.splitlines()]


@pytest.mark.skipif(
    host_memory.huge_page_environment({}) is None, reason="needs glibc"
)
def test_the_command_restarts_once_in_place_with_its_arguments(tmp_path):
  lines = run_probe(tmp_path)
  # The original start, the restarted start, then the run: one restart.
  assert [line["stage"] for line in lines] == ["start", "start", "running"]
  assert len({line["pid"] for line in lines}) == 1  # replaced, not a child
  running = lines[-1]
  assert running["argv"] == ["--flag=1", "word"]
  assert running["utf8_mode"] == 1  # interpreter options carried over
  assert running["tunables"] == HUGE


def test_the_command_does_not_restart_when_opted_out(tmp_path):
  lines = run_probe(tmp_path, IRTF_JAX_SYSTEM_MALLOC="1")
  assert [line["stage"] for line in lines] == ["start", "running"]
  assert lines[-1]["tunables"] is None
