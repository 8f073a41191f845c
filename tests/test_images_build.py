"""Package images, for real: specs built by the Docker Engine (installing from Debian, PyPI
and npm), then code run against them in ordinary, hardened sandboxes.

Test images get unique names and are removed afterwards; the shipped specs
(images/*.toml) are built (or found up to date) and kept, as setup does.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from execbox import Executor, ImageNotFoundError, InvalidRequestError
from execbox.engine.base import Engine
from execbox.images import IMAGE_LABEL, default_image
from execbox.images.build import build_spec, host_ca_bundle, list_spec_images, prune_specs, remove_spec
from execbox.images.spec import SPEC_LABEL, ImageSpec, spec_alias

from .conftest import busy

pytestmark = [pytest.mark.docker, pytest.mark.timeout(900)]

ROOT = Path(__file__).resolve().parent.parent
DATA = Path(__file__).resolve().parent / "data" / "images"


@dataclasses.dataclass
class Built:
    name: str
    tag: str
    log: list[str]


def build_unique(engine: Engine, path: Path) -> Built:
    """Build the spec at ``path`` under a name of this test run, without the layer cache:
    pip, npm and apt really install, every time."""
    spec = ImageSpec.load(path)
    spec = dataclasses.replace(spec, name=f"{spec.name}-t{uuid.uuid4().hex[:8]}")
    log: list[str] = []
    tag = build_spec(engine, spec, progress=log.append, force=True, ca_bundle=host_ca_bundle())
    return Built(spec.name, tag, log)


def api(engine: Engine) -> Any:
    """The Docker client, to inspect an image's whole configuration."""
    return engine.api  # type: ignore[attr-defined]


def cleanup(engine: Engine, name: str) -> None:
    try:
        remove_spec(engine, name)
    except InvalidRequestError:
        pass  # already gone


@pytest.fixture(scope="module")
def tiny(engine: Engine) -> Iterator[Built]:
    built = build_unique(engine, DATA / "tiny.toml")
    yield built
    cleanup(engine, built.name)


@pytest.fixture(scope="module")
def with_packages(engine: Engine) -> Iterator[Built]:
    built = build_unique(engine, DATA / "with-packages.toml")
    yield built
    cleanup(engine, built.name)


def run(ex: Executor, image: str, code: str, language: str = "python", **kw: Any) -> str:
    r = ex.execute(code, language=language, image=image, **kw)
    assert r.exit_code == 0, r
    return r.stdout


def test_a_spec_is_really_built_and_labelled(engine: Engine, tiny: Built) -> None:
    # This build installed from PyPI, npm and Debian (no layer cache).
    log = "\n".join(tiny.log)
    assert "Successfully installed six-1.17.0" in log
    assert "added 1 package" in log  # is-number, no dependencies
    assert "Setting up jq" in log
    assert tiny.tag.startswith(f"execbox-spec:{tiny.name}--")
    info = api(engine).inspect_image(spec_alias(tiny.name))
    assert f"{tiny.tag}" in info["RepoTags"]
    assert info["Config"]["Labels"][IMAGE_LABEL] == "spec"
    assert info["Config"]["Labels"][SPEC_LABEL] == tiny.name
    # The sandbox runs exactly as on the base image: same command, user, working dir, environment.
    assert info["Config"]["Labels"]["execbox.spec.base"] == default_image()
    base = api(engine).inspect_image(default_image())
    for key in ("Cmd", "Entrypoint", "User", "WorkingDir", "Env"):
        assert info["Config"][key] == base["Config"][key], key
    assert [s.tag for s in list_spec_images(engine) if s.name == tiny.name and s.current] == [tiny.tag]


def test_packages_import_in_warm_and_cold_runs(executor: Executor, tiny: Built) -> None:
    image = tiny.name
    assert run(executor, image, "import six; print(six.__version__)") == "1.17.0\n"
    # A PYTHON* variable starts the interpreter cold (python3 main.py): same packages.
    assert run(executor, image, "import six; print(six.__version__)", env={"PYTHONHASHSEED": "0"}) == "1.17.0\n"
    js = "console.log(require('is-number')(5), require('is-number')('x'))"
    assert run(executor, image, js, "javascript") == "true false\n"
    assert run(executor, image, js, "javascript", env={"NODE_NO_WARNINGS": "1"}) == "true false\n"
    esm = "import('is-number').then(m => console.log(m.default('7')))"  # ES modules find /node_modules too
    assert run(executor, image, esm, "javascript") == "true\n"
    assert run(executor, image, "jq -n '1 + 2'", "bash") == "3\n"  # the apt package
    # Files of the spec, readable by the sandbox's user.
    assert run(executor, image, "cat /opt/tiny/greeting.txt", "bash") == "hello from the image\n"
    code = "import sys; sys.path.append('/opt/tiny/lib'); import tinylib; print(tinylib.GREETING)"
    assert run(executor, image, code) == "hi from tinylib\n"
    # What exactly was installed is recorded in the image.
    assert "six==1.17.0" in run(executor, image, "cat /usr/local/share/execbox-spec/pip-freeze.txt", "bash")


def test_package_image_keeps_the_sandbox_hardening(executor: Executor, tiny: Built) -> None:
    code = r"""
import errno, json, os, six
status = dict(line.split(":", 1) for line in open("/proc/self/status").read().splitlines())
out = {k: status[k].strip() for k in ("Seccomp", "NoNewPrivs", "CapBnd", "CapEff", "CapPrm")}
out["uid"], out["gid"] = os.getuid(), os.getgid()
out["six_writable"] = os.access(six.__file__, os.W_OK)
for target in (os.path.dirname(six.__file__) + "/evil.py", "/node_modules/evil.js", "/opt/tiny/evil", "/evil"):
    try:
        open(target, "w")
        out[target] = "written"
    except OSError as exc:
        out[target] = errno.errorcode[exc.errno]
print(json.dumps(out))
"""
    out = json.loads(run(executor, tiny.name, code))
    assert out["uid"] >= 1000 and out["gid"] >= 1000, out  # a non-root UID, as on the base image
    assert out["Seccomp"] == "2" and out["NoNewPrivs"] == "1", out
    assert out["CapBnd"] == out["CapEff"] == out["CapPrm"] == "0000000000000000", out
    assert out["six_writable"] is False
    written = {k: v for k, v in out.items() if k.startswith("/")}
    assert set(written.values()) == {"EROFS"}, written  # read-only root, packages included
    # Every installed file is readable by any UID and writable by none but root; no pip or
    # npm in the image to install anything at run time.
    listing = (
        "dirs='/node_modules /usr/local/lib/python3.11/dist-packages /usr/local/share/execbox-spec /opt/tiny'; "
        "find $dirs | wc -l; find $dirs ! -perm -o=r; find $dirs ! -type l -perm /o=w,g=w; "
        "command -v pip pip3 npm || true"
    )
    lines = run(executor, tiny.name, listing, "bash").split()
    assert int(lines[0]) > 20 and lines[1:] == [], lines


def test_seed_dockerfile_with_packages(executor: Executor, with_packages: Built) -> None:
    """The seed's FAQ: build once with packages (Dockerfile.with-packages), use everywhere."""
    assert "added 1 package" in "\n".join(with_packages.log)  # lodash has no dependencies
    code = "const _ = require('lodash'); console.log(_.VERSION, JSON.stringify(_.chunk([1, 2, 3, 4], 2)))"
    for _ in range(3):  # every run a new container, every one with lodash
        assert run(executor, with_packages.name, code, "javascript") == "4.17.21 [[1,2],[3,4]]\n"
    # Not on the default image: the package comes from the package image.
    r = executor.execute("require('lodash')", language="javascript")
    assert r.exit_code == 1 and "Cannot find module 'lodash'" in r.stderr


def test_packages_installed_at_run_time_vanish(executor: Executor, with_packages: Built, tiny: Built) -> None:
    # JavaScript: "npm install" into the run's own node_modules works for that run only;
    # the image's /node_modules cannot be written.
    install = r"""
const fs = require('fs');
fs.mkdirSync('node_modules/left-pad', {recursive: true});
fs.writeFileSync('node_modules/left-pad/index.js', 'module.exports = (s, n) => String(s).padStart(n)');
console.log(JSON.stringify(require('left-pad')(5, 3)));
try { fs.mkdirSync('/node_modules/left-pad'); console.log('image written'); } catch (e) { console.log(e.code); }
"""
    assert run(executor, with_packages.name, install, "javascript") == '"  5"\nEROFS\n'
    after = r"""
try { require('left-pad'); console.log('still installed'); } catch (e) { console.log(e.code); }
console.log(typeof require('lodash').chunk);
"""
    assert run(executor, with_packages.name, after, "javascript") == "MODULE_NOT_FOUND\nfunction\n"
    # Python: a user-site install ("pip install --user") likewise.
    install_py = r"""
import errno, os, site, six, sys
user_site = os.path.expanduser(f"~/.local/lib/python{sys.version_info[0]}.{sys.version_info[1]}/site-packages")
os.makedirs(user_site + "/leftpad")
with open(user_site + "/leftpad/__init__.py", "w") as fh:
    fh.write("def pad(s, n): return str(s).rjust(n)\n")
site.addsitedir(user_site)
import leftpad
print(repr(leftpad.pad(5, 3)))
try:
    open(os.path.join(os.path.dirname(six.__file__), "leftpad.py"), "w")
except OSError as exc:
    print(errno.errorcode[exc.errno])
"""
    assert run(executor, tiny.name, install_py) == "'  5'\nEROFS\n"
    after_py = r"""
import os, six
try:
    import leftpad
    print("still installed")
except ModuleNotFoundError:
    print("gone", os.path.exists(os.path.expanduser("~/.local")), six.__version__)
"""
    assert run(executor, tiny.name, after_py) == "gone False 1.17.0\n"


def test_unknown_image_name_is_an_invalid_request_before_any_container(engine: Engine, executor: Executor) -> None:
    made = executor.factory.made
    for name in (f"no-such-image-{uuid.uuid4().hex[:8]}", "Not A Name"):
        with pytest.raises(InvalidRequestError) as err:
            executor.execute("print(1)", language="python", image=name)
        assert err.value.field == "image"
        assert not busy(executor)
    if executor.pool is None:  # (a pool creates its ready containers in the background)
        assert executor.factory.made == made
    # A full reference that does not exist is the engine's answer, as before.
    with pytest.raises(ImageNotFoundError):
        executor.execute("print(1)", language="python", image="execbox-spec:nope--000000000000")


def test_rebuilt_only_when_the_spec_changes(engine: Engine, executor: Executor, tmp_path: Path) -> None:
    name = f"notes-t{uuid.uuid4().hex[:8]}"
    (tmp_path / "note.txt").write_text("v1\n")
    path = tmp_path / "notes.toml"
    path.write_text(f'name = "{name}"\n[files]\n"/opt/note.txt" = "note.txt"\n')
    a = engine
    try:
        first: list[str] = []
        tag1 = build_spec(a, ImageSpec.load(path), progress=first.append)
        assert any(line.startswith("Successfully built") for line in first)
        id1 = a.image_info(tag1).id  # type: ignore[union-attr]

        again: list[str] = []
        assert build_spec(a, ImageSpec.load(path), progress=again.append) == tag1
        assert f"{tag1} is up to date" in again and not any(line.startswith("Step") for line in again)
        assert a.image_info(tag1).id == id1  # type: ignore[union-attr]

        (tmp_path / "note.txt").write_text("v2\n")
        tag2 = build_spec(a, ImageSpec.load(path), progress=lambda m: None)
        assert tag2 != tag1
        assert a.image_info(spec_alias(name)).id == a.image_info(tag2).id  # type: ignore[union-attr]
        assert run(executor, name, "cat /opt/note.txt", "bash") == "v2\n"
        builds = {s.tag: s.current for s in list_spec_images(a) if s.name == name}
        assert builds == {tag1: False, tag2: True}

        assert prune_specs(a, name) == [tag1]
        assert {s.tag for s in list_spec_images(a) if s.name == name} == {tag2}
    finally:
        executor.drain()  # a pool removes used sandboxes in the background: none may still use the image
        cleanup(engine, name)
    with pytest.raises(InvalidRequestError) as err:
        executor.execute("cat /opt/note.txt", language="bash", image=name)
    assert err.value.field == "image"


def test_spec_on_another_spec(engine: Engine, tmp_path: Path, with_packages: Built) -> None:
    # Files only: no build stage, so no build tools on that base (those take half a minute;
    # checked by hand: pip and npm packages on another spec work the same).
    name = f"layered-t{uuid.uuid4().hex[:8]}"
    (tmp_path / "main.js").write_text("module.exports = () => require('lodash').VERSION;\n")
    path = tmp_path / "layered.toml"
    path.write_text(f'name = "{name}"\nbase = "{with_packages.name}"\n[files]\n"/opt/app/main.js" = "main.js"\n')
    try:
        tag = build_spec(engine, ImageSpec.load(path), progress=lambda m: None)
        assert engine.image_info(tag).labels["execbox.spec.base"] == with_packages.tag  # type: ignore[union-attr]
        with Executor(engine=engine, pool=False, sweep_on_start=False) as ex:
            assert run(ex, name, "console.log(require('/opt/app/main.js')())", "javascript") == "4.17.21\n"
    finally:
        cleanup(engine, name)


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "execbox.cli", *args],
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_cli_build_from_flags_ls_run_rm(engine: Engine, tmp_path: Path) -> None:
    name = f"flags-t{uuid.uuid4().hex[:8]}"
    (tmp_path / "hello.txt").write_text("hello from a flag-built image\n")
    try:
        r = cli("images", "build", "--name", name, "--file", f"/opt/hello.txt={tmp_path / 'hello.txt'}")
        assert r.returncode == 0, r.stderr
        assert f"{name}: execbox-spec:{name}--" in r.stdout.splitlines()[-1]
        r = cli("images", "ls")
        assert r.returncode == 0 and f'image="{name}"  files: 1' in r.stdout, r.stdout
        r = cli("run", "--image", name, "-l", "bash", "-c", "cat /opt/hello.txt; id -u")
        assert r.returncode == 0, r.stderr
        hello, uid = r.stdout.splitlines()
        assert hello == "hello from a flag-built image" and int(uid) != 0
        r = cli("images", "rm", name)
        assert r.returncode == 0 and f"removed execbox-spec:{name}" in r.stdout.splitlines()
    finally:
        cleanup(engine, name)
    r = cli("run", "--image", name, "-l", "bash", "-c", "true")
    assert r.returncode == 2 and "invalid image" in r.stderr and name in r.stderr
    r = cli("images", "rm", name)
    assert r.returncode == 2 and "no package image" in r.stderr


@pytest.mark.parametrize(
    ("spec", "language", "code", "expected"),
    [
        (
            "data",
            "python",
            "import numpy as np, pandas as pd\n"
            "df = pd.DataFrame({'x': np.arange(4), 'g': list('abab')})\n"
            "print(df.groupby('g')['x'].sum().to_dict())",
            "{'a': 2, 'b': 4}\n",
        ),
        (
            "web",
            "javascript",
            "const axios = require('axios'); const _ = require('lodash');\n"
            "console.log(typeof axios.get, JSON.stringify(_.chunk([1, 2, 3], 2)))",
            "function [[1,2],[3]]\n",
        ),
    ],
)
def test_shipped_specs(engine: Engine, executor: Executor, spec: str, language: str, code: str, expected: str) -> None:
    # Built by setup; up to date here unless the sandbox image changed since.
    build_spec(engine, ImageSpec.load(ROOT / "images" / f"{spec}.toml"), ca_bundle=host_ca_bundle())
    assert run(executor, spec, code, language) == expected


def test_service_runs_package_images_a_tenant_may_name(engine: Engine, tmp_path: Path, with_packages: Built) -> None:
    from .serverkit import KEY_A, KEY_B, TENANTS_TOML, live_server, settings, write_tenants

    missing = f"not-built-{uuid.uuid4().hex[:8]}"
    tenants = TENANTS_TOML.replace(
        "[tenants.alpha.max_limits]", f'images = ["{with_packages.name}", "{missing}"]\n\n[tenants.alpha.max_limits]'
    )
    code = "console.log(require('lodash').VERSION)"
    with live_server(engine, settings(write_tenants(tmp_path, tenants)), pool=False) as srv:
        with srv.client(KEY_A) as c:
            r = c.post("/v1/execute", json={"code": code, "image": with_packages.name})
            assert r.status_code == 200 and r.json()["stdout"] == "4.17.21\n", r.text
            r = c.post("/v1/execute", json={"code": code, "image": missing})  # allowed, but not built
            assert r.status_code == 422 and r.json()["error"]["field"] == "image", r.text
        with srv.client(KEY_B) as c:  # bravo may use the default image only
            r = c.post("/v1/execute", json={"code": code, "image": with_packages.name})
            assert r.status_code == 403 and r.json()["error"]["field"] == "image", r.text


def test_cli_build_shows_steps_and_names_the_log_on_failure(tmp_path: Path) -> None:
    log = tmp_path / "build.log"
    name = f"broken-t{uuid.uuid4().hex[:8]}"
    r = cli("images", "build", "--log", str(log), "--name", name, "--apt", "execbox-no-such-package")
    assert r.returncode != 0
    # Steps on stderr, one line each (not a terminal here); the build's own lines in the log.
    assert f"[1] package image '{name}':" in r.stderr
    assert f"the build failed; its whole output is in {log}" in r.stderr
    text = log.read_text()
    assert "execbox-no-such-package" in text and "Step 1/" in text
    # The error on stderr ends with the build's last lines, which say why.
    assert "Unable to locate package execbox-no-such-package" in r.stderr
