"""The kernel's record of an OOM kill in a container's memory cgroup (execbox/engine/_kmsg.py):
parsing, on a file laid out as /dev/kmsg, and the real kernel log of a real OOM kill."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from execbox.engine._kmsg import KMSG, memcg_oom_killed

ID = "af1fa56ffcc0add792abd6dceb548e1b072b140bfa6e0cd15d7c8726433bb8a4"
OTHER = "ffd1056dc37ecb512514675dabf3835eae02bb4b523ccb70cc55055c7077a215"


def _log(tmp_path: Path, *records: str) -> str:
    path = tmp_path / "kmsg"
    path.write_text("".join(f"6,{i},1000,-;{r}\n" for i, r in enumerate(records)))
    return str(path)


def test_an_oom_kill_in_the_containers_memory_cgroup_is_found(tmp_path: Path) -> None:
    filler = [f"eth0: some line {i}" for i in range(3000)]  # records across many reads
    path = _log(
        tmp_path,
        *filler,
        f"oom-kill:constraint=CONSTRAINT_MEMCG,nodemask=(null),cpuset={ID},mems_allowed=0,"
        f"oom_memcg=/docker/{ID},task_memcg=/docker/{ID},task=exe,pid=14457,uid=65534",
        "Memory cgroup out of memory: Killed process 14457 (exe)",
    )
    assert memcg_oom_killed(ID, path)
    assert not memcg_oom_killed(OTHER, path)


def test_other_mentions_of_the_container_are_not_an_oom_kill(tmp_path: Path) -> None:
    path = _log(
        tmp_path,
        f"Memory cgroup stats for /docker/{ID}:",  # printed for another cgroup's OOM as well
        f"oom-kill:constraint=CONSTRAINT_MEMCG,cpuset={ID},oom_memcg=/docker/{OTHER},task_memcg=/docker/{OTHER}",
        f"audit: comm=exe container {ID}",
    )
    assert not memcg_oom_killed(ID, path)
    assert memcg_oom_killed(OTHER, path)


def test_no_log_or_no_id_finds_nothing(tmp_path: Path) -> None:
    assert not memcg_oom_killed(ID, str(tmp_path / "missing"))
    assert not memcg_oom_killed("", _log(tmp_path, f"oom-kill:oom_memcg=/docker/{ID}"))


@pytest.mark.docker
def test_the_kernel_log_has_a_real_oom_kill_of_a_container() -> None:
    import docker

    from execbox.images import default_image

    if not os.access(KMSG, os.R_OK):
        pytest.skip(f"{KMSG} not readable here")
    api = docker.APIClient(version="1.41")
    made = []
    try:
        for code in ("b = bytearray(300 << 20)", "print(1)"):
            c = api.create_container(
                default_image(),
                ["python3", "-c", code],
                host_config=api.create_host_config(mem_limit="32m", memswap_limit="32m"),
                labels={"execbox.managed": "1", "execbox.kind": "test"},
            )
            made.append(c["Id"])
            api.start(c["Id"])
            api.wait(c["Id"], timeout=60)
        killed, fine = made
        assert api.inspect_container(killed)["State"]["ExitCode"] == 137
        assert memcg_oom_killed(killed)
        assert not memcg_oom_killed(fine)
    finally:
        for cid in made:
            api.remove_container(cid, force=True)
