"""Package image specs without Docker: parsing, validation, the generated Dockerfile,
the hash that names a build, and how a request's image name is resolved."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest

from execbox import InvalidRequestError
from execbox.engine.base import Channel, Engine, ResourceInfo, SandboxSpec, SandboxState
from execbox.images.build import resolve_image_name
from execbox.images.spec import BUILD_CA, FileEntry, ImageSpec, render

ROOT = Path(__file__).resolve().parent.parent
DATA = Path(__file__).resolve().parent / "data" / "images"
BASE, BASE_ID, TOOLS = "execbox-sandbox:0123456789ab", "sha256:" + "1" * 64, "execbox-buildtools:ba9876543210"


def spec_of(text: str, tmp_path: Path, filename: str = "spec.toml") -> ImageSpec:
    path = tmp_path / filename
    path.write_text(text)
    return ImageSpec.load(path)


def test_shipped_specs_are_valid_and_pinned() -> None:
    data = ImageSpec.load(ROOT / "images" / "data.toml")
    web = ImageSpec.load(ROOT / "images" / "web.toml")
    assert data.name == "data" and {p.split("==")[0] for p in data.pip} == {"numpy", "pandas"}
    assert web.name == "web" and {p.split("@")[0] for p in web.npm} == {"axios", "lodash"}
    assert data.alias == "execbox-spec:data"


def test_test_specs_load_with_files_relative_to_the_spec(tmp_path: Path) -> None:
    tiny = ImageSpec.load(DATA / "tiny.toml")
    assert tiny.apt == ("jq",) and tiny.pip == ("six==1.17.0",) and tiny.npm == ("is-number@7.0.0",)
    assert {f.dest: f.source for f in tiny.files} == {
        "/opt/tiny/greeting.txt": DATA / "tiny-files" / "greeting.txt",
        "/opt/tiny/lib": DATA / "tiny-files" / "lib",
    }
    assert ImageSpec.load(DATA / "with-packages.toml").npm == ("lodash@4.17.21",)
    # Without a name, the file's name is the image's name.
    assert spec_of('pip = ["six==1.17.0"]', tmp_path, "my-image.toml").name == "my-image"


@pytest.mark.parametrize(
    ("text", "field", "match"),
    [
        ('pip = ["six"]', "spec.pip", "pinned"),
        ('pip = ["six>=1.16"]', "spec.pip", "pinned"),
        ('pip = ["six==1.17.0", "Six==1.16.0"]', "spec.pip", "more than once"),
        ('pip = ["six==1.17.0; rm -rf /"]', "spec.pip", "pinned"),
        ('npm = ["lodash"]', "spec.npm", "exact version"),
        ('npm = ["lodash@^4.17.21"]', "spec.npm", "exact version"),
        ('npm = ["lodash@latest"]', "spec.npm", "exact version"),
        ('apt = ["jq && curl evil"]', "spec.apt", "Debian package"),
        ('name = "Data"', "spec.name", "not a valid image name"),
        ('name = "a--b"', "spec.name", "not a valid image name"),
        ('name = "x"\npip = "six==1.17.0"', "spec.pip", "list of strings"),
        ('name = "x"\nbogus = 1', "spec", "unknown keys"),
        ('[files]\n"/work/a" = "spec.toml"', "spec.files", "reserved"),
        ('[files]\n"/tmp/a" = "spec.toml"', "spec.files", "reserved"),
        ('[files]\n"/opt/execbox/agent.py" = "spec.toml"', "spec.files", "reserved"),
        ('[files]\n"/node_modules/x" = "spec.toml"', "spec.files", "reserved"),
        ('[files]\n"relative" = "spec.toml"', "spec.files", "absolute"),
        ('[files]\n"/opt/../etc/x" = "spec.toml"', "spec.files", "absolute and normalized"),
        ('[files]\n"/opt/a b" = "spec.toml"', "spec.files", "spaces"),
        ('[files]\n"/opt/a" = "missing.txt"', "spec.files", "not a file or folder"),
        ("name = [", "spec", "not valid TOML"),
    ],
)
def test_invalid_specs_name_the_key(tmp_path: Path, text: str, field: str, match: str) -> None:
    with pytest.raises(InvalidRequestError, match=match) as err:
        spec_of(text, tmp_path, "x.toml")
    assert err.value.field == field
    assert "x.toml" in err.value.message  # where the bad spec is


def test_missing_spec_file_is_an_invalid_request(tmp_path: Path) -> None:
    with pytest.raises(InvalidRequestError, match="cannot read") as err:
        ImageSpec.load(tmp_path / "nope.toml")
    assert err.value.field == "spec"


def test_dockerfile_installs_in_a_build_stage_and_copies_only_the_result() -> None:
    spec = ImageSpec.load(DATA / "tiny.toml")
    plan = render(spec, BASE, BASE_ID, TOOLS, ca_bundle=b"CA")
    build, final = plan.dockerfile.split(f"FROM {BASE}\n")
    assert build.splitlines()[1] == f"FROM {TOOLS} AS build"
    assert "pip install" in build and "--root /staging" in build and "six==1.17.0" in build
    assert "npm install" in build and "is-number@7.0.0" in build and "chmod -R a+rX,go-w /staging" in build
    # The CA for pip and npm stays in the build stage; the final stage only copies /staging.
    assert BUILD_CA in build and "CA" not in final and "pip" not in final and "npm" not in final
    assert "apt-get install" in final and " jq " in final
    assert "COPY --from=build /staging/ /" in final
    assert "COPY files/0 /opt/tiny/greeting.txt" in final and "COPY files/1/ /opt/tiny/lib/" in final
    # Nothing that would change how the sandbox runs: user, command, entrypoint, env, workdir.
    for keyword in ("USER", "CMD", "ENTRYPOINT", "ENV", "WORKDIR", "VOLUME"):
        assert not any(line.startswith(keyword) for line in final.splitlines()), keyword
    assert plan.context["files/0"] == (b"hello from the image\n", 0o644)
    assert plan.context["files/1/tinylib.py"][1] == 0o644
    assert plan.extra == {"build-ca.pem": (b"CA", 0o644)}


def test_a_base_with_a_user_is_switched_to_root_for_apt_and_back() -> None:
    spec = ImageSpec(name="x", apt=("jq",))
    dockerfile = render(spec, BASE, BASE_ID, None, base_user="1000:1000").dockerfile
    lines = dockerfile.splitlines()
    assert lines[2] == "USER root" and lines[-1] == "USER 1000:1000"
    assert "AS build" not in dockerfile  # no pip, no npm: no build stage


def test_build_stage_needs_the_build_tools() -> None:
    with pytest.raises(ValueError):
        render(ImageSpec(name="x", pip=("six==1.17.0",)), BASE, BASE_ID, None)


def test_digest_changes_with_content_only(tmp_path: Path) -> None:
    (tmp_path / "f.txt").write_text("one")
    spec = ImageSpec(name="x", pip=("six==1.17.0",), files=(FileEntry("/opt/f.txt", tmp_path / "f.txt"),))
    digest = render(spec, BASE, BASE_ID, TOOLS).digest
    same = [
        render(spec, BASE, BASE_ID, TOOLS),
        render(spec, BASE, BASE_ID, TOOLS, ca_bundle=b"another CA"),  # the CA is not content
        render(dataclasses.replace(spec, origin="elsewhere/x.toml"), BASE, BASE_ID, TOOLS),
    ]
    assert {p.digest for p in same} == {digest}
    different = [
        render(dataclasses.replace(spec, pip=("six==1.16.0",)), BASE, BASE_ID, TOOLS),
        render(dataclasses.replace(spec, npm=("is-number@7.0.0",)), BASE, BASE_ID, TOOLS),
        render(dataclasses.replace(spec, description="new words"), BASE, BASE_ID, TOOLS),
        render(spec, BASE, "sha256:" + "2" * 64, TOOLS),  # same tag, rebuilt base
        render(spec, "execbox-sandbox:ffffffffffff", BASE_ID, TOOLS),
        render(spec, BASE, BASE_ID, "execbox-buildtools:000000000000"),
    ]
    (tmp_path / "f.txt").write_text("two")
    different.append(render(spec, BASE, BASE_ID, TOOLS))
    (tmp_path / "f.txt").chmod(0o755)
    different.append(render(spec, BASE, BASE_ID, TOOLS))
    digests = [p.digest for p in different]
    assert digest not in digests and len(set(digests)) == len(digests)
    assert spec.tag(digest) == f"execbox-spec:x--{digest[:12]}"


class ImagesOnly(Engine):
    """An engine that knows a fixed set of images and can do nothing else."""

    def __init__(self, images: set[str]) -> None:
        self.images = images
        self.asked: list[str] = []

    def image_exists(self, image: str) -> bool:
        self.asked.append(image)
        return image in self.images

    def ping(self) -> None: ...
    def create(self, spec: SandboxSpec) -> str:
        raise AssertionError("no container may be made")

    def attach(self, sandbox_id: str) -> Channel:
        raise AssertionError

    def start(self, sandbox_id: str) -> None:
        raise AssertionError

    def kill(self, sandbox_id: str) -> None:
        raise AssertionError

    def wait(self, sandbox_id: str, timeout: float) -> SandboxState:
        raise AssertionError

    def state(self, sandbox_id: str) -> SandboxState:
        raise AssertionError

    def remove(self, sandbox_id: str) -> None:
        raise AssertionError

    def list_resources(self, label: str) -> list[ResourceInfo]:
        return []

    def remove_resource(self, resource: ResourceInfo) -> None:
        raise AssertionError


def test_resolve_image_name() -> None:
    engine = ImagesOnly({"execbox-spec:data", "busybox"})
    assert resolve_image_name(engine, "data") == "execbox-spec:data"
    assert resolve_image_name(engine, "busybox") == "busybox"  # a local image named without a tag
    # References go to the engine as they are (no lookup: the default image costs nothing).
    for ref in ("execbox-sandbox:abc", "registry.example/x", "x@sha256:" + "0" * 64):
        engine.asked.clear()
        assert resolve_image_name(engine, ref) == ref and engine.asked == []
    for bad in ("nope", "Data", "a b", "a..b", "", "x" * 41):
        with pytest.raises(InvalidRequestError) as err:
            resolve_image_name(engine, bad)
        assert err.value.field == "image"


def test_cli_rejects_bad_specs_before_touching_docker(tmp_path: Path) -> None:
    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        env = {"PATH": "/usr/bin:/bin", "DOCKER_HOST": "unix:///nonexistent.sock"}
        return subprocess.run(
            [sys.executable, "-m", "execbox.cli", "images", "build", *args],
            capture_output=True,
            text=True,
            env=env,
            timeout=60,
        )

    r = cli("--name", "x", "--pip", "six")
    assert r.returncode == 2 and "invalid spec.pip" in r.stderr and "pinned" in r.stderr
    r = cli("--pip", "six==1.17.0")
    assert r.returncode == 2 and "--name is needed" in r.stderr
    r = cli("--name", "x", "--file", "/opt/x")
    assert r.returncode == 2 and "invalid file" in r.stderr
    r = cli(str(DATA / "with-packages.toml"), "--name", "with-packages", "--npm", "lodash@4.17.21")
    assert r.returncode == 2 and "more than one spec named with-packages" in r.stderr
    r = cli(str(tmp_path / "missing.toml"))
    assert r.returncode == 2 and "cannot read" in r.stderr
